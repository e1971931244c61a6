"""Short-axis cine DICOM folders, written from a phantom subject inside the test with pydicom: slice order,
frame order, spacing and affine recovered; mixed series, missing frames and inconsistent geometry refused."""
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from synth4d.cine import DataError  # noqa: E402
from synth4d.cine.datasets import scan  # noqa: E402

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(folder, subject, series_uid=None, shuffle=True):
    """One DICOM file per slice and frame, named in random order (the reader must not trust names)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    a = subject.affine
    lps = RAS_TO_LPS @ a[:3]
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    row_dir, col_dir = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]
    X, Y, Z, T = subject.image.shape
    names = np.random.default_rng(0).permutation(Z * T) if shuffle else np.arange(Z * T)
    for z in range(Z):
        for t in range(T):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            d = Dataset()
            d.file_meta = meta
            d.SOPClassUID, d.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            d.SeriesInstanceUID, d.Modality = series_uid, "MR"
            d.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
            d.ImagePositionPatient = [float(v) for v in lps @ np.array([0, 0, z, 1.0])]
            d.PixelSpacing = [float(spacing[1]), float(spacing[0])]
            d.TriggerTime = float(t * subject.frame_ms)
            d.InstanceNumber = z * T + t + 1
            d.Rows, d.Columns = Y, X
            d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
            d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 0
            d.RescaleSlope, d.RescaleIntercept = 0.5, -100.0
            stored = np.round((subject.image[:, :, z, t] + 100.0) / 0.5).astype(np.uint16)
            d.PixelData = np.ascontiguousarray(stored.T).tobytes()
            d.save_as(folder / f"IM{names[z * T + t]:05d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def phantom_subject(tiny_phantom):
    return scan(tiny_phantom).refs[0].load()


def test_dicom_series_read_back(phantom_subject, tmp_path):
    s = phantom_subject
    write_series(tmp_path / "cines" / "case1", s)
    write_series(tmp_path / "cines" / "case2", s)
    ds = scan(tmp_path / "cines")
    assert ds.layout == "dicom" and [r.id for r in ds.refs] == ["case1", "case2"]
    got = ds.refs[0].load()
    assert got.image.shape == s.image.shape and not got.masks
    np.testing.assert_allclose(got.image, s.image, atol=0.25)           # stored at 0.5 steps, rescaled back
    np.testing.assert_allclose(got.affine, s.affine, atol=1e-3)
    np.testing.assert_allclose(got.spacing, s.spacing, atol=1e-4)
    assert got.frame_ms == pytest.approx(s.frame_ms, abs=1e-3)
    one = scan(tmp_path / "cines" / "case1")                             # a single series folder given directly
    assert [r.id for r in one.refs] == ["case1"]


def test_dicom_hostile_series(phantom_subject, tmp_path):
    s = phantom_subject
    folder = write_series(tmp_path / "mixed", s)
    other = write_series(tmp_path / "other", s)
    next(other.iterdir()).rename(folder / "stray.dcm")
    with pytest.raises(DataError, match="series mixed"):
        scan(tmp_path / "mixed")
    folder = write_series(tmp_path / "missing", s)
    sorted(folder.iterdir())[0].unlink()
    with pytest.raises(DataError, match="missing frames"):
        scan(folder)
    folder = write_series(tmp_path / "tilted", s)
    f = sorted(folder.iterdir())[3]
    d = pydicom.dcmread(f)
    d.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    d.save_as(f)
    with pytest.raises(DataError, match="inconsistent geometry") as e:
        scan(folder)
    assert f.name in str(e.value)
