"""The one module that owns NIfTI: read returns array + geometry, write inverts it exactly.

Axis order is the file's voxel order, untouched: (X, Y, Z) for a frame or mask, (X, Y, Z, T)
for a cine. No reorientation happens here (see cine.prep for the canonical grid).
Geometry is the voxel-to-world affine (mm), the voxel spacing (mm) and the frame duration (ms).
Every problem raises cine.DataError naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from synth4d.cine import DataError, atomic_write, first_line

_TIME_TO_MS = {"sec": 1000.0, "msec": 1.0, "usec": 1e-3}


@dataclass(frozen=True)
class Geometry:
    affine: np.ndarray          # (4, 4) float64, voxel -> world (mm)
    spacing: tuple              # (sx, sy, sz) mm
    frame_ms: Optional[float]   # one frame's duration, None when unknown or 3D

    def __eq__(self, other):
        return (isinstance(other, Geometry) and np.allclose(self.affine, other.affine, atol=1e-4)
                and np.allclose(self.spacing, other.spacing, atol=1e-4)
                and (self.frame_ms == other.frame_ms or (self.frame_ms is not None and other.frame_ms is not None
                                                         and abs(self.frame_ms - other.frame_ms) < 1e-3)))

    @staticmethod
    def from_spacing(spacing, frame_ms=None, origin=(0.0, 0.0, 0.0)) -> "Geometry":
        """An axis-aligned geometry (for generated data): diagonal affine with the given spacing."""
        affine = np.diag([float(s) for s in spacing] + [1.0])
        affine[:3, 3] = origin
        return Geometry(affine, tuple(float(s) for s in spacing), frame_ms)


MAX_VOXELS = 1 << 28            # 268M, a 512 x 512 x 32-slice x 32-frame cine: real cines are far smaller
SPACING_MM = (0.01, 100.0)      # plausible voxel sizes; a header outside claims metres or microns
STREAM_CHECK_BYTES = 1 << 26    # above this, the data a compressed file claims is counted before it is allocated


def _open(path: Path, check_data: bool):
    """nib.load with every header-level check, before any voxel data is read or allocated: the claimed
    size against MAX_VOXELS and against the file (a compressed file is counted, not unpacked, when it
    claims more than STREAM_CHECK_BYTES and check_data is set), the data type, the voxel spacing and the
    affine."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():   # nibabel logs its repairs: a user sees one line
            img = nib.load(str(path))
            with nib.openers.ImageOpener(str(path)) as f:  # the header as stored, before nibabel repairs it
                stored = type(img.header).from_fileobj(f, check=False)
        shape, dtype = tuple(int(s) for s in img.header.get_data_shape()), img.header.get_data_dtype()
        offset = int(img.header.get("vox_offset", 0))
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # nibabel raises many types for foreign or truncated headers
        raise DataError(path, f"not a readable NIfTI file ({type(e).__name__})") from None
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    if voxels > MAX_VOXELS:
        raise DataError(path, f"header claims {voxels} voxels {shape}, more than any cine ({MAX_VOXELS}); not read")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(path, f"unsupported voxel type {dtype} (expected integers or real floats)")
    need = voxels * dtype.itemsize
    if path.name.endswith(".gz"):
        if check_data and need > STREAM_CHECK_BYTES and _unpacked_size(path, offset + need) < offset + need:
            raise DataError(path, f"header claims {need} bytes of voxel data, more than the file holds")
    elif path.stat().st_size < offset + need:
        raise DataError(path, f"header claims {need} bytes of voxel data, the file holds {path.stat().st_size}")
    pixdim = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(np.abs(pixdim) < SPACING_MM[0]) or np.any(np.abs(pixdim) > SPACING_MM[1]):
        raise DataError(path, f"voxel spacing {tuple(float(x) for x in pixdim)} mm is outside "
                              f"{SPACING_MM[0]}-{SPACING_MM[1]} mm")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(path, "the voxel-to-world affine is not finite or not invertible")
    return img


def _unpacked_size(path: Path, limit: int) -> int:
    """Bytes of a gzip file once unpacked, counted up to `limit` in 16 MB pieces (none of it kept)."""
    import gzip
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while n < limit and (piece := f.read(1 << 24)):
                n += len(piece)
    except (OSError, EOFError, ValueError):
        pass
    return n


def _dims(path, shape, ndim) -> tuple:
    """shape, with a trailing singleton time axis dropped for a 3D frame; DataError if not ndim-D."""
    if ndim == 3 and len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if ndim is not None and len(shape) != ndim:
        what = {3: "a 3D frame (X, Y, Z)", 4: "a 4D cine (X, Y, Z, T)"}[ndim]
        raise DataError(path, f"expected {what}, found {len(shape)}D data of shape {tuple(shape)}")
    return shape


def peek(path, ndim=None) -> tuple:
    """(shape, affine) from the header alone: nibabel loads voxel data lazily, so nothing else is read."""
    img = _open(Path(path), check_data=False)
    return _dims(path, tuple(int(s) for s in img.shape), ndim), np.asarray(img.affine, dtype=np.float64)


def read(path, ndim=None, kind="image"):
    """Read a NIfTI file -> (array, Geometry). kind "image": float32, finite; "mask": uint8 labels.

    ndim: 3 or 4 to insist on a frame or a cine (a trailing singleton time axis is dropped for 3).
    """
    path = Path(path)
    img = _open(path, check_data=True)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated / foreign files
        raise DataError(path, f"not a readable NIfTI file ({type(e).__name__}: {first_line(e)})") from None
    data = data.reshape(_dims(path, data.shape, ndim))
    zooms = img.header.get_zooms()
    spacing = tuple(float(z) for z in zooms[:3])
    frame_ms = None
    if data.ndim == 4 and len(zooms) > 3 and zooms[3] > 0:
        unit = img.header.get_xyzt_units()[1]
        frame_ms = float(zooms[3]) * _TIME_TO_MS.get(unit, 1000.0 if zooms[3] < 10 else 1.0)
    geom = Geometry(np.asarray(img.affine, dtype=np.float64), spacing, frame_ms)
    if kind == "mask":
        if not np.issubdtype(data.dtype, np.integer):
            if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
                raise DataError(path, "mask holds non-integer values")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(path, f"mask values outside 0-255 (min {data.min()}, max {data.max()})")
        return np.asarray(data, dtype=np.uint8), geom
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise DataError(path, f"image contains {int(np.sum(~np.isfinite(data)))} NaN or infinite intensities")
    return data, geom


def write(path, array, geometry: Geometry, kind="image", descrip: str = ""):
    """Write atomically (temp file + rename): a reader never sees a half-written file.

    kind "image": stored as float32 (int16 when the values are integers); "mask": uint8, with the
    NIfTI label-map intent (1002, NIFTI_INTENT_LABEL). `descrip` goes into the header's description
    field (at most 79 characters).
    """
    array = np.asarray(array)
    if kind == "mask":
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, geometry.affine)
    hdr = img.header
    zooms = list(geometry.spacing)
    if array.ndim == 4:
        zooms.append(float(geometry.frame_ms) if geometry.frame_ms else 1.0)
    hdr.set_zooms(zooms[:array.ndim])
    hdr.set_xyzt_units("mm", "msec")
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    if kind == "mask":
        hdr.set_intent("label", name="labels")
    if descrip:
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
