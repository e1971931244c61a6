"""Short-axis cine DICOM: a folder of one series' files (or a folder of such folders) as 4D subjects.

This is how clinical exports and the Kaggle Data Science Bowl cines arrive: unlabelled, so they train
the image path. pydicom reads them (the optional `dicom` extra). The scan reads headers only:
  slices   ordered along the slice normal (ImageOrientationPatient row x column direction), by the
           projection of ImagePositionPatient on it; the slice spacing is the (even) distance between them;
  frames   within each slice, by TriggerTime (InstanceNumber when it is missing);
  spacing  PixelSpacing (between rows, between columns) and the slice spacing;
  affine   from those tags, turned from DICOM's LPS to NIfTI's RAS+ world.
Refused, one line each naming the folder: files of several series, slices with unequal frame counts
(missing frames), files disagreeing on orientation, pixel spacing or matrix, unevenly spaced or
coincident slices. Intensities get RescaleSlope / RescaleIntercept.

Axis vocabulary: a cine (X, Y, Z, T) with X the column index and Y the row index of each DICOM image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth4d.cine import DataError, UserError
from synth4d.cine.nifti import MAX_VOXELS
from synth4d.cine.subject import Subject, SubjectRef

TOL_MM = 0.05        # positions and spacings that differ by less are equal
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def is_dicom(path: Path) -> bool:
    """A Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))


def subject_folders(root: Path) -> list:
    """Folders holding DICOM files: root itself, else its sub-folders (any depth) that hold some."""
    if _files(root):
        return [root]
    return sorted(d for d in root.rglob("*") if d.is_dir() and not d.name.startswith(".") and _files(d))


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("reading DICOM needs pydicom: pip install 'synth4d[dicom]'") from None
    return pydicom


@dataclass
class _Plan:
    files: list          # [[path per frame] per slice], slices in order along the normal
    affine: np.ndarray
    spacing: tuple
    frame_ms: float
    shape: tuple


def plan(folder: Path) -> _Plan:
    """Order one folder's files into (slices, frames) and derive the geometry, from headers alone."""
    pydicom = _pydicom()
    heads = []
    for path in _files(folder):
        try:
            d = pydicom.dcmread(path, stop_before_pixels=True)
            iop = np.array([float(v) for v in d.ImageOrientationPatient])
            ipp = np.array([float(v) for v in d.ImagePositionPatient])
            ps = tuple(float(v) for v in d.PixelSpacing)
            heads.append({"path": path, "series": str(d.SeriesInstanceUID), "iop": iop, "ipp": ipp, "ps": ps,
                          "shape": (int(d.Rows), int(d.Columns)),
                          "time": float(d.TriggerTime) if "TriggerTime" in d else None,
                          "number": int(d.InstanceNumber) if "InstanceNumber" in d else 0})
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            raise DataError(path, f"not a usable cine image (missing or bad {e.args[0] if e.args else 'tag'})") from None
        except Exception as e:  # pydicom's own errors on a damaged file
            raise DataError(path, f"unreadable DICOM ({type(e).__name__})") from None
    series = {h["series"] for h in heads}
    if len(series) > 1:
        raise DataError(folder, f"files of {len(series)} series mixed in one folder; give one series per folder")
    first = heads[0]
    for h in heads:
        if not np.allclose(h["iop"], first["iop"], atol=1e-4):
            raise DataError(h["path"], "orientation differs from the other files' (inconsistent geometry)")
        if not np.allclose(h["ps"], first["ps"], atol=1e-4) or h["shape"] != first["shape"]:
            raise DataError(h["path"], "pixel spacing or matrix differs from the other files'")
    row, col = first["iop"][:3], first["iop"][3:]
    normal = np.cross(row, col)
    slices = {}
    for h in heads:
        s = float(h["ipp"] @ normal)
        key = next((k for k in slices if abs(k - s) < TOL_MM), s)
        slices.setdefault(key, []).append(h)
    order = sorted(slices)
    counts = {len(slices[k]) for k in order}
    if len(counts) > 1:
        raise DataError(folder, f"slices have {min(counts)} to {max(counts)} frames (missing frames)")
    gaps = np.diff(order)
    if len(order) > 1 and (gaps.min() < TOL_MM or gaps.max() - gaps.min() > max(TOL_MM, 0.01 * gaps.mean())):
        raise DataError(folder, f"slices are not evenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm apart)")
    files = []
    for k in order:
        frames = sorted(slices[k], key=lambda h: (h["time"] if h["time"] is not None else h["number"], h["number"]))
        files.append([h["path"] for h in frames])
    dz = float(gaps.mean()) if len(order) > 1 else 1.0
    start = min(slices[order[0]], key=lambda h: h["number"])["ipp"]
    # voxel (x = column, y = row, z = slice) -> LPS: start + x * dc * row + y * dr * col + z * dz * normal
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * first["ps"][1], col * first["ps"][0], normal * dz
    lps[:3, 3] = start
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    times = [h["time"] for h in slices[order[0]]]
    T = len(files[0])
    frame_ms = float(np.mean(np.diff(sorted(times)))) if None not in times and T > 1 else None
    shape = (first["shape"][1], first["shape"][0], len(order), T)
    if int(np.prod(shape)) > MAX_VOXELS:
        raise DataError(folder, f"{shape} voxels: more than any cine ({MAX_VOXELS})")
    return _Plan(files, affine, (first["ps"][1], first["ps"][0], dz), frame_ms, shape)


def ref(folder: Path, root: Path) -> SubjectRef:
    p = plan(folder)
    sid = "_".join(folder.relative_to(root).parts) if folder != root else root.name
    files = {"image": str(folder)}
    meta = {"source": "dicom", "slices": p.shape[2]}
    return SubjectRef(sid, "dicom", str(folder), 0, None, None, meta, files, _Loader(sid, str(folder), meta))


@dataclass
class _Loader:
    id: str
    folder: str
    meta: dict

    def __call__(self) -> Subject:
        pydicom = _pydicom()
        p = plan(Path(self.folder))
        image = np.zeros(p.shape, np.float32)
        for z, frames in enumerate(p.files):
            for t, path in enumerate(frames):
                try:
                    d = pydicom.dcmread(path)
                    pixels = d.pixel_array.astype(np.float32)
                except Exception as e:
                    raise DataError(path, f"unreadable pixel data ({type(e).__name__})") from None
                slope, intercept = float(getattr(d, "RescaleSlope", 1) or 1), float(getattr(d, "RescaleIntercept", 0) or 0)
                image[:, :, z, t] = pixels.T * slope + intercept
        if not np.all(np.isfinite(image)):
            raise DataError(self.folder, "image contains NaN or infinite intensities")
        return Subject(self.id, image, p.affine, p.spacing, p.frame_ms, {}, 0, None, None, dict(self.meta), None,
                       self.folder)
