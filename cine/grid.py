"""Where generated subjects are placed in the world: an output grid (in-plane size and spacing, slice
spacing, orientation, centre), the default one, one copied from a reference NIfTI, and the resampling
of a generated cine and mask from the model's grid onto it.

The model's grid is a heart-centred in-plane crop; on the output grid the heart stays in the middle of
the field of view, and what lies beyond the model's crop is background (the darkest value, label 0).
Images are resampled with cine.prep's separable weights (linear interpolation when the output is
finer, area averaging when coarser). Masks onto a finer grid take the nearest voxel's label (each
structure keeps its connectivity: no holes, no splits, no label bleeding); onto a coarser one, one-hot
area averages + argmax.
Slices are not resampled: the slice spacing is asked of the generator instead.

Axis vocabulary: a cine (X, Y, Z, T), a mask (X, Y, Z, T); the affine maps voxel (x, y, z) to world mm
(RAS+, as NIfTI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from synth4d.cine import UserError, nifti
from synth4d.cine.prep import _resample, _resample_labels, _weights

# A typical short-axis orientation in RAS+: slices run from base to apex, towards the patient's left,
# front and feet; the in-plane axes are orthogonal to it, right-handed.
SA_NORMAL = np.array([-0.55, 0.55, -0.63])


def short_axis_rotation() -> np.ndarray:
    """(3, 3) direction cosines (columns: in-plane x, in-plane y, slice normal) of SA_NORMAL."""
    n = SA_NORMAL / np.linalg.norm(SA_NORMAL)
    u = np.cross(n, [0.0, 0.0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    return np.stack([u, v, n], axis=1)


@dataclass(frozen=True)
class OutputGrid:
    """Where the files' voxels lie. Fields left None keep the model's own (size, spacing, slice spacing)."""

    size: Optional[tuple] = None          # (nx, ny) voxels in-plane
    spacing: Optional[tuple] = None       # (sx, sy) mm in-plane
    slice_mm: Optional[float] = None      # slice spacing, asked of the generator
    slices: Optional[int] = None          # slice count, asked of the generator (at most the model's)
    rotation: tuple = tuple(map(tuple, short_axis_rotation()))   # (3, 3) direction cosines, as nested tuples
    centre: tuple = (0.0, 0.0, 0.0)      # world mm of the volume's centre

    def describe(self) -> dict:
        return {"size": self.size, "spacing": self.spacing, "slice_mm": self.slice_mm, "slices": self.slices,
                "rotation": [list(r) for r in self.rotation], "centre": list(self.centre)}


def like(path, size=None, spacing=None) -> OutputGrid:
    """The grid of a reference NIfTI (3D or 4D): its in-plane size and spacing, slice spacing and count,
    direction cosines and field-of-view centre; `size` / `spacing` override the figures they give."""
    shape, affine = nifti.peek(path)
    if len(shape) < 3:
        raise UserError(f"--like {path}: a 3D or 4D image is needed, this one is {len(shape)}D")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    rotation = affine[:3, :3] / zooms
    centre = affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2) + affine[:3, 3]
    return OutputGrid(size=tuple(size) if size else (int(shape[0]), int(shape[1])),
                      spacing=tuple(spacing[:2]) if spacing else (float(zooms[0]), float(zooms[1])),
                      slice_mm=float(spacing[2]) if spacing and len(spacing) > 2 else float(zooms[2]),
                      slices=int(shape[2]), rotation=tuple(map(tuple, rotation)), centre=tuple(float(c) for c in centre))


def explicit(size=None, spacing=None) -> OutputGrid:
    """The default orientation with `size` (nx, ny) and `spacing` (sx, sy[, sz]) set where given."""
    if size is not None and min(size) < 8:
        raise UserError(f"--size {size}: at least 8 x 8 voxels")
    if spacing is not None and not all(0.1 <= s <= 20 for s in spacing):
        raise UserError(f"--spacing {spacing}: every spacing between 0.1 and 20 mm")
    return OutputGrid(size=tuple(size) if size else None, spacing=tuple(spacing[:2]) if spacing else None,
                      slice_mm=float(spacing[2]) if spacing and len(spacing) > 2 else None)


def place(image, labels, spacing, grid: OutputGrid, bg: float):
    """A generated cine and mask on the model's grid (in-plane `spacing` (sx, sy, sz) mm, heart centred)
    -> (image, labels, affine) on `grid`, the heart in the middle of its field of view."""
    nx, ny = grid.size or image.shape[:2]
    sx, sy = grid.spacing or spacing[:2]
    w, w_labels = [], []
    for n_out, n_in, s_out, s_in in ((nx, image.shape[0], sx, spacing[0]), (ny, image.shape[1], sy, spacing[1])):
        step = s_out / s_in
        start = (n_in - 1) / 2 - (n_out - 1) / 2 * step
        if abs(step - 1) < 1e-6:   # same spacing: whole-voxel offset (within half a voxel of centred), no blur
            start, step = float(np.floor(start + 0.5)), 1.0
        w.append(_weights(int(n_out), n_in, start, step))
        # Finer output: labels by nearest voxel (every source voxel keeps at least one output voxel, so each
        # structure keeps its connectivity); coarser: one-hot area averages + argmax.
        w_labels.append(_weights(int(n_out), n_in, start, step, "nearest") if step < 1 else w[-1])
    if grid.size is None and grid.spacing is None:
        out_image, out_labels = image, labels
    else:
        out_image = _resample(image, w[0], w[1], bg=bg)
        out_labels = _resample_labels(labels, w_labels[0], w_labels[1])
    zooms = np.array([sx, sy, spacing[2]], dtype=np.float64)
    rotation = np.asarray(grid.rotation, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = rotation * zooms
    half = (np.array([nx, ny, image.shape[2]]) - 1) / 2
    affine[:3, 3] = np.asarray(grid.centre) - affine[:3, :3] @ half
    return out_image.astype(np.float32), out_labels.astype(np.uint8), affine
