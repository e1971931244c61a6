"""The M&Ms-2 layout, built from phantom subjects inside the test: ED/ES found by matching the 3D volumes
to the cine, M&Ms label order mapped, diagnosis codes mapped or kept as other; and an M&Ms-1 tree whose
information CSV sits above the folder given, as in the published tree."""
import numpy as np
import pytest
from click.testing import CliRunner

from synth4d import cli
from synth4d.cine import DataError, nifti
from synth4d.cine.datasets import scan
from synth4d.cine.info import info_report

TO_MNMS = np.array([0, 3, 2, 1], np.uint8)   # ACDC 1 RV, 3 LV -> M&Ms 1 LV, 3 RV (its own inverse)
HEADER = "SUBJECT_CODE,DISEASE,FIELD,VENDOR,SCANNER\n"


def _mnms2_subject(root, code, phantom_folder, upper=True):
    """An M&Ms-2 subject folder from a phantom subject: the cine, ED/ES volumes and M&Ms-ordered masks."""
    s = next(r for r in scan(phantom_folder.parent).refs if r.id == phantom_folder.name).load()
    folder = root / code
    folder.mkdir(parents=True)
    name = (lambda x: x) if upper else str.lower
    geom = nifti.Geometry(s.affine, s.spacing, s.frame_ms)
    frame = nifti.Geometry(s.affine, s.spacing, None)
    nifti.write(folder / name(f"{code}_SA_CINE.nii.gz"), s.image, geom)
    for phase, t in (("ED", s.ed), ("ES", s.es)):
        nifti.write(folder / name(f"{code}_SA_{phase}.nii.gz"), s.image[..., t], frame)
        nifti.write(folder / name(f"{code}_SA_{phase}_gt.nii.gz"), TO_MNMS[s.masks[t]], frame, kind="mask")
    nifti.write(folder / f"{code}_LA_CINE.nii.gz", s.image[:, :, :1], geom)   # long axis: ignored
    return s


@pytest.fixture()
def tree(tiny_phantom, tmp_path):
    root = tmp_path / "MnM2" / "dataset"
    truth = {"001": _mnms2_subject(root, "001", tiny_phantom / "patient001"),
             "002": _mnms2_subject(root, "002", tiny_phantom / "patient002", upper=False),
             "003": _mnms2_subject(root, "003", tiny_phantom / "patient003")}
    (tmp_path / "MnM2" / "dataset_information.csv").write_text(
        HEADER + "001,NOR,1.5,SIEMENS,Avanto\n002,LV,3,PHILIPS,Achieva\n003,ARV,1.5,GE,Signa\n")
    return root, truth


def test_mnms2_frames_labels_and_diagnoses(tree):
    root, truth = tree
    ds = scan(root)                           # the CSV one folder up, as published
    assert ds.layout == "mnms2" and [r.id for r in ds.refs] == ["001", "002", "003"]
    for ref in ds.refs:
        s, t = ref.load(), truth[ref.id]
        assert (s.ed, s.es) == (t.ed, t.es) and sorted(s.masks) == sorted({t.ed, t.es})
        for f in s.masks:
            np.testing.assert_array_equal(s.masks[f], t.masks[f])          # back in ACDC order
        np.testing.assert_array_equal(s.image, t.image)
    one, two, three = (r.load() for r in ds.refs)
    assert (one.dx, two.dx, three.dx) == ("NOR", None, "RV")
    assert two.meta["diagnosis"] == "LV" and one.meta["vendor"] == "SIEMENS"
    report = info_report(root)
    assert report["layout"] == "mnms2" and report["diagnoses"] == {"NOR": 1, "other": 1, "RV": 1}
    assert report["other_diagnoses"] == {"LV": 1}


def test_mnms2_ambiguous_or_unmatched_volumes_are_refused(tree):
    root, truth = tree
    path = root / "001" / "001_SA_CINE.nii.gz"
    image, geom = nifti.read(path, ndim=4)
    t = truth["001"]
    image[..., (t.ed + 1) % image.shape[3]] = image[..., t.ed]          # two frames equal the ED volume
    nifti.write(path, image, geom)
    with pytest.raises(DataError, match="ambiguous") as e:
        scan(root).refs[0].load()
    assert "001_SA_ED.nii.gz" in str(e.value)
    ed = root / "002" / "002_sa_ed.nii.gz"
    vol, g = nifti.read(ed, ndim=3)
    nifti.write(ed, vol * 0.5, g)                                          # a volume that is no frame
    with pytest.raises(DataError, match="matches no frame"):
        scan(root).refs[1].load()


def test_mnms2_missing_row_and_missing_csv(tree, tmp_path):
    root, _ = tree
    (tmp_path / "MnM2" / "dataset_information.csv").write_text(HEADER + "001,NOR,1.5,SIEMENS,Avanto\n")
    with pytest.raises(DataError, match="no row for subject '002'"):
        scan(root)
    (tmp_path / "MnM2" / "dataset_information.csv").unlink()
    with pytest.raises(DataError, match="--csv"):
        scan(root)
    elsewhere = tmp_path / "info.csv"
    elsewhere.write_text(HEADER + "001,NOR,1,A,a\n002,HCM,1,B,b\n003,TRI,1,C,c\n")
    ds = scan(root, csv_path=elsewhere)
    assert [r.dx for r in ds.refs] == ["NOR", "HCM", None]
    result = CliRunner().invoke(cli, ["info", str(root), "--csv", str(elsewhere), "--json"])
    assert result.exit_code == 0 and '"TRI": 1' in result.stdout
    result = CliRunner().invoke(cli, ["train-vae", str(root), "--csv", str(elsewhere), "--preset", "tiny", "--steps", "1",
                                      "--out", str(tmp_path / "vae"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0 and (tmp_path / "vae" / "vae.safetensors").is_file(), result.output


def test_mnms1_csv_above_the_folder_given_and_case_insensitive(tiny_phantom, tmp_path):
    top = tmp_path / "OpenDataset"
    labelled = top / "Training" / "Labeled"
    s = scan(tiny_phantom).refs[0].load()
    folder = labelled / "A1B2C3"
    folder.mkdir(parents=True)
    geom = nifti.Geometry(s.affine, s.spacing, s.frame_ms)
    nifti.write(folder / "A1B2C3_SA.nii.gz", s.image, geom)
    mask = np.zeros(s.image.shape, np.uint8)
    for t, m in s.masks.items():
        mask[..., t] = TO_MNMS[m]
    nifti.write(folder / "A1B2C3_SA_GT.nii.gz", mask, geom, kind="mask")
    (top / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").write_text(
        "External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight\n"
        f"A1B2C3,Siemens,A,1,{s.ed},{s.es},50,IHD,M,170,70\n")
    ds = scan(labelled)
    ref = ds.refs[0]
    assert ds.layout == "mnms" and ref.dx is None and ref.meta["diagnosis"] == "IHD"
    loaded = ref.load()
    for t in s.masks:
        np.testing.assert_array_equal(loaded.masks[t], s.masks[t])
