"""Preprocessing to the fixed training grid: a heart-centred in-plane crop, resampled, intensity in [-1, 1].

Axis vocabulary: a cine is (X, Y, Z, T), a frame mask (X, Y, Z), per-class maps (C, X, Y, Z[, T]).
"Canonical" means the source voxel grid with its axes permuted so that Z is the slice axis (the
one with the largest spacing); the in-plane axes keep their voxel order, nothing is flipped.
The grid is (grid.size, grid.size, grid.slices) at (grid.spacing, grid.spacing, slice spacing):
in-plane it samples a crop of grid.size * grid.spacing mm around the heart; slices are kept as
they are (a contiguous block of at most grid.slices), padded at the end to grid.slices.

Resampling is separable: a small (n_out, n_in) weight matrix per in-plane axis, applied with
einsum. Each output voxel averages the source over its own footprint (linear interpolation
when upsampling, area averaging when downsampling); weight that falls outside the source
field of view goes to the background value. Masks are resampled as one-hot maps + argmax.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from synth4d.cine import DataError, atomic_write
from synth4d.cine.datasets import scan
from synth4d.cine.measures import clinical_measures
from synth4d.cine.nifti import Geometry
from synth4d.cine.subject import Subject

PREP_VERSION = 1            # bump when the output of prepare_subject changes: invalidates every cache
PERCENTILES = (0.5, 99.5)   # intensities mapped to -1 and 1
CENTRE_SMOOTH_MM = 10.0     # smoothing of the temporal-variation map used to find the heart


@dataclass
class Prepared:
    """One subject on the training grid, with what is needed to map results back to its source grid."""

    id: str
    image: np.ndarray                 # (X, Y, Z, T) float32 in [-1, 1], Z padded with -1
    masks: dict                       # frame -> (X, Y, Z) uint8, Z padded with 0
    full_mask: Optional[np.ndarray]   # (X, Y, Z, T) uint8 or None (phantom ground truth)
    n_slices: int                     # slices of the grid that hold data; the rest is padding
    ed: int
    es: Optional[int]
    dx: Optional[str]
    meta: dict
    spacing: tuple                    # (grid.spacing, grid.spacing, slice spacing) mm
    frame_ms: Optional[float]
    # The source and the crop: "shape" (X, Y, Z, T), "affine", "spacing" of the source as stored; "perm"
    # (canonical axis i is source axis perm[i]); "origin" (x, y) of grid voxel 0 in canonical source
    # voxels, "scale" (x, y) source voxels per grid voxel, "z0" the first kept slice; "intensity" (lo, hi)
    # the source intensities mapped to -1 and 1.
    src: dict
    measures: dict = field(default_factory=dict)  # clinical_measures of the source ED/ES masks, if both exist


# ---- resampling --------------------------------------------------------------------------

def _weights(n_out: int, n_in: int, start: float, step: float, order: str = "linear") -> np.ndarray:
    """(n_out, n_in) float32: output i samples the input at voxel position start + i * step.

    linear: output i averages the input, taken as piecewise constant, over a box of width
    max(step, 1) centred on its position: exactly linear interpolation for step <= 1, area
    averaging (anti-aliasing) for step > 1. nearest: the closest input voxel. Rows sum to less
    than 1 where the footprint leaves the input: the missing share is background.
    """
    pos = start + step * np.arange(n_out)  # (n_out,)
    w = np.zeros((n_out, n_in), dtype=np.float64)
    if order == "nearest":
        j = np.floor(pos + 0.5).astype(np.int64)
        inside = (j >= 0) & (j < n_in)
        w[np.flatnonzero(inside), j[inside]] = 1.0
        return w.astype(np.float32)
    if order != "linear":
        raise ValueError(f"order must be 'linear' or 'nearest', not {order!r}")
    width = max(abs(step), 1.0)
    reach = int(np.ceil(width / 2 + 0.5))
    j = np.floor(pos)[:, None].astype(np.int64) + np.arange(-reach, reach + 1)  # (n_out, taps) candidate inputs
    overlap = np.minimum(pos[:, None] + width / 2, j + 0.5) - np.maximum(pos[:, None] - width / 2, j - 0.5)
    overlap = np.clip(overlap, 0.0, None) / width
    inside = (j >= 0) & (j < n_in)
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)
    np.add.at(w, (rows[inside], j[inside]), overlap[inside])
    return w.astype(np.float32)


def _resample(a: np.ndarray, wx: np.ndarray, wy: np.ndarray, bg: float) -> np.ndarray:
    """Apply wx along axis 0 and wy along axis 1 of a (X, Y, ...) -> (len(wx), len(wy), ...) float32."""
    cols_x, cols_y = np.flatnonzero(wx.any(0)), np.flatnonzero(wy.any(0))
    if not len(cols_x) or not len(cols_y):
        return np.full((len(wx), len(wy)) + a.shape[2:], bg, dtype=np.float32)
    # Only the columns that carry weight are read: the crop is small next to a full MRI field of view.
    x0, x1, y0, y1 = cols_x[0], cols_x[-1] + 1, cols_y[0], cols_y[-1] + 1
    part = np.asarray(a[x0:x1, y0:y1], dtype=np.float32) - np.float32(bg)
    out = np.einsum("ix,jy,xy...->ij...", wx[:, x0:x1], wy[:, y0:y1], part, optimize=True)
    return out + np.float32(bg)


def _resample_labels(labels: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Labels (X, Y, ...) resampled as one-hot maps + argmax, so thin structures do not vanish."""
    best_p = _resample((labels == 0).astype(np.float32), wx, wy, bg=1.0)
    best = np.zeros(best_p.shape, dtype=np.uint8)
    for c in np.unique(labels):
        if c == 0:
            continue
        p = _resample((labels == c).astype(np.float32), wx, wy, bg=0.0)
        better = p > best_p
        best[better], best_p[better] = c, p[better]
    return best


# ---- where the heart is ------------------------------------------------------------------

def _canonical_perm(spacing) -> tuple:
    """Axis order putting the slice axis last; with ties (isotropic data) the last such axis stays Z."""
    spacing = np.asarray(spacing, dtype=np.float64)
    z = int(np.flatnonzero(spacing >= spacing.max() - 1e-6)[-1])
    return tuple(a for a in range(3) if a != z) + (z,)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian smoothing, so the borders are not darkened."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / max(sigma, 1e-3)) ** 2)
    return g / g.sum(1, keepdims=True)


def find_heart_centre(image: np.ndarray, spacing) -> tuple:
    """In-plane (x, y) voxel position of the heart in a canonical (X, Y, Z, T) cine without masks.

    The heart is what changes most over the cardiac cycle: the temporal std per voxel, averaged
    over the middle slices (apex and base move less and are often off-centre), smoothed, and
    the weighted centroid of its values above halfway between its median and its maximum.
    """
    nz = image.shape[2]
    mid = image[:, :, nz // 4: nz - nz // 4] if nz >= 3 else image
    var = mid.std(axis=3, dtype=np.float64).mean(axis=2)  # (X, Y)
    gx = _gaussian_matrix(var.shape[0], CENTRE_SMOOTH_MM / spacing[0])
    gy = _gaussian_matrix(var.shape[1], CENTRE_SMOOTH_MM / spacing[1])
    var = gx @ var @ gy.T
    med = np.median(var)
    w = np.clip(var - (med + 0.5 * (var.max() - med)), 0.0, None)
    if w.sum() <= 0:  # a static image: nothing moves, take the middle of the field of view
        return ((var.shape[0] - 1) / 2, (var.shape[1] - 1) / 2)
    x, y = np.meshgrid(np.arange(var.shape[0]), np.arange(var.shape[1]), indexing="ij")
    return (float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum()))


def _heart_mask(masks: dict, ed: int) -> Optional[np.ndarray]:
    """The (X, Y, Z) heart (labels 1-3) at ED, else at the first labelled frame with any; None if none."""
    for t in [ed] + sorted(masks):
        if t in masks and masks[t].any():
            return masks[t] > 0
    return None


# ---- one subject -------------------------------------------------------------------------

def prepare_subject(subject: Subject, grid) -> Prepared:
    """Subject -> Prepared on grid (a nets.config.GridConfig); see the module docstring."""
    where = subject.path or subject.id
    image = np.asarray(subject.image)
    if image.ndim != 4:
        raise DataError(where, f"expected a 4D cine (X, Y, Z, T), got shape {image.shape}")
    for t, m in subject.masks.items():
        if m.shape != image.shape[:3] or not 0 <= t < image.shape[3]:
            raise DataError(where, f"mask of frame {t} (shape {m.shape}) does not fit the image {image.shape}")
    perm = _canonical_perm(subject.spacing)
    img = np.transpose(image, perm + (3,))  # (X, Y, Z, T) canonical
    masks = {t: np.transpose(m, perm) for t, m in subject.masks.items()}
    spacing = tuple(float(subject.spacing[a]) for a in perm)
    nz = img.shape[2]

    heart = _heart_mask(masks, subject.ed)
    if heart is not None:
        cx, cy = (float(c.mean()) for c in np.nonzero(heart)[:2])
    else:
        cx, cy = find_heart_centre(img, spacing)
    n = min(nz, grid.slices)
    z0 = _slice_start(heart, nz, grid.slices)

    step = (grid.spacing / spacing[0], grid.spacing / spacing[1])
    # The crop origin is a whole source voxel: at equal spacing the grid then copies voxels, with no blur.
    origin = tuple(float(np.round(c - (grid.size - 1) / 2 * s)) for c, s in zip((cx, cy), step))
    wx = _weights(grid.size, img.shape[0], origin[0], step[0])
    wy = _weights(grid.size, img.shape[1], origin[1], step[1])

    out = _resample(img[:, :, z0:z0 + n], wx, wy, bg=float(img.min()))  # (size, size, n, T)
    lo, hi = (float(v) for v in np.percentile(out, PERCENTILES))
    out = np.clip((out - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1).astype(np.float32)
    pad = ((0, 0), (0, 0), (0, grid.slices - n), (0, 0))
    out = np.pad(out, pad, constant_values=-1.0)
    grid_masks = {t: np.pad(_resample_labels(m[:, :, z0:z0 + n], wx, wy), pad[:3]) for t, m in masks.items()}
    full = None
    if subject.full_mask is not None:
        full = np.transpose(np.asarray(subject.full_mask), perm + (3,))[:, :, z0:z0 + n]
        full = np.pad(_resample_labels(full, wx, wy), pad)

    measures = {}
    if subject.es is not None and subject.ed in subject.masks and subject.es in subject.masks:
        measures = clinical_measures(subject.masks[subject.ed], subject.masks[subject.es], subject.spacing)
    src = {"shape": tuple(int(s) for s in image.shape), "affine": np.asarray(subject.affine, dtype=np.float64),
           "spacing": tuple(float(s) for s in subject.spacing), "perm": perm, "origin": origin,
           "scale": step, "z0": int(z0), "intensity": (lo, hi)}
    return Prepared(subject.id, out, grid_masks, full, n, subject.ed, subject.es, subject.dx, dict(subject.meta),
                    (float(grid.spacing), float(grid.spacing), spacing[2]), subject.frame_ms, src, measures)


def _slice_start(heart: Optional[np.ndarray], nz: int, slices: int) -> int:
    """First slice of the kept block: the one holding most heart, else the central one."""
    if nz <= slices:
        return 0
    central = (nz - slices) // 2
    if heart is None:
        return central
    per_slice = heart.sum(axis=(0, 1))                          # (Z,)
    totals = np.convolve(per_slice, np.ones(slices), "valid")   # (nz - slices + 1,) heart per block
    best = np.flatnonzero(totals == totals.max())
    return int(best[np.argmin(np.abs(best - central))])


def prepare_image(image4d, geometry: Geometry, grid, id: str = "") -> Prepared:
    """An unlabelled (X, Y, Z, T) cine (segment's input) -> Prepared, centred by find_heart_centre."""
    subject = Subject(id, np.asarray(image4d, dtype=np.float32), geometry.affine, geometry.spacing,
                      geometry.frame_ms)
    return prepare_subject(subject, grid)


# ---- back to the source grid -------------------------------------------------------------

def to_source(prob_or_labels: np.ndarray, prepared: Prepared, order: str = "linear") -> np.ndarray:
    """Map grid results back onto the subject's source voxel grid (the inverse of crop + resample).

    Float (C, X, Y, Z[, T]) per-class maps -> (C, sx, sy, sz[, T]) float32; outside the crop and
    the kept slices class 0 (background) is 1. Integer (X, Y, Z[, T]) labels -> uint8 labels on
    the source grid (one-hot mapped, then argmax). Padding slices are dropped.
    """
    src = prepared.src
    perm, (ox, oy), (stx, sty), z0 = src["perm"], src["origin"], src["scale"], src["z0"]
    n_can = tuple(src["shape"][a] for a in perm)  # (X, Y, Z) canonical source
    labels = np.issubdtype(prob_or_labels.dtype, np.integer)
    size_x, size_y = prob_or_labels.shape[int(not labels): int(not labels) + 2]
    # Source voxel u lies at grid position (u - origin) / scale.
    wx = _weights(n_can[0], size_x, -ox / stx, 1.0 / stx, order)
    wy = _weights(n_can[1], size_y, -oy / sty, 1.0 / sty, order)
    n = prepared.n_slices
    inverse = tuple(int(i) for i in np.argsort(perm))  # canonical -> source axis order
    if labels:
        return _place(_resample_labels(prob_or_labels[:, :, :n], wx, wy), n_can[2], z0, inverse, bg=0)
    return np.stack([_place(_resample(p[:, :, :n], wx, wy, bg=float(c == 0)), n_can[2], z0, inverse, bg=float(c == 0))
                     for c, p in enumerate(prob_or_labels)])


def _place(core: np.ndarray, n_z: int, z0: int, inverse: tuple, bg) -> np.ndarray:
    """A canonical (sx, sy, n, ...) block put at its slices z0.. of n_z, in the source's own axis order."""
    full = np.full(core.shape[:2] + (n_z,) + core.shape[3:], bg, dtype=core.dtype)
    full[:, :, z0:z0 + core.shape[2]] = core
    return np.transpose(full, inverse + tuple(range(3, full.ndim)))


def grid_affine(prepared: Prepared) -> np.ndarray:
    """(4, 4) grid voxel -> world (mm) affine of prepared's grid (e.g. to write it as NIfTI)."""
    src = prepared.src
    canon_to_src = np.zeros((4, 4))
    canon_to_src[3, 3] = 1.0
    for i, a in enumerate(src["perm"]):
        canon_to_src[a, i] = 1.0  # canonical axis i is source axis perm[i]
    grid_to_canon = np.diag([src["scale"][0], src["scale"][1], 1.0, 1.0])
    grid_to_canon[:3, 3] = (src["origin"][0], src["origin"][1], src["z0"])
    return src["affine"] @ canon_to_src @ grid_to_canon


# ---- a data set, cached ------------------------------------------------------------------

def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synth4d"


def cache_key(ref, grid) -> str:
    """Hash of the prep version, the grid and the subject's files (path, size, mtime) and metadata."""
    files = dict(ref.files)
    files.setdefault("image", ref.path)
    stats = {}
    for role, path in sorted(files.items()):
        try:
            st = os.stat(path)
        except OSError as e:  # vanished or unreadable since the scan
            raise DataError(path, f"cannot read ({e.strerror})") from None
        stats[role] = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    blob = json.dumps([PREP_VERSION, dataclasses.asdict(grid), ref.id, ref.ed, ref.es, ref.dx, ref.meta, stats],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save_prepared(path, p: Prepared):
    """Write a compressed .npz atomically; the image is stored as float16."""
    frames = sorted(p.masks)
    info = {"id": p.id, "n_slices": p.n_slices, "ed": p.ed, "es": p.es, "dx": p.dx, "meta": p.meta,
            "spacing": p.spacing, "frame_ms": p.frame_ms, "measures": p.measures,
            "src": {**p.src, "affine": p.src["affine"].tolist()}}
    arrays = {"image": p.image.astype(np.float16), "frames": np.array(frames, dtype=np.int64),
              "masks": np.stack([p.masks[t] for t in frames]) if frames else np.zeros((0,) + p.image.shape[:3], np.uint8),
              "info": np.array(json.dumps(info, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))}
    if p.full_mask is not None:
        arrays["full_mask"] = p.full_mask
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))  # tmp ends in .npz: no suffix added


def load_prepared(path) -> Prepared:
    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        src = {k: tuple(v) if isinstance(v, list) else v for k, v in info["src"].items()}
        src["affine"] = np.asarray(info["src"]["affine"], dtype=np.float64)
        masks = {int(t): m for t, m in zip(z["frames"], z["masks"])}
        full = z["full_mask"] if "full_mask" in z.files else None
        return Prepared(info["id"], z["image"].astype(np.float32), masks, full, info["n_slices"], info["ed"],
                        info["es"], info["dx"], info["meta"], tuple(info["spacing"]), info["frame_ms"], src,
                        info["measures"])


def prepare_refs(refs, grid, cache_dir=None, skip_bad=False, progress=True, half=False) -> list:
    """Load and prepare each SubjectRef through the cache <cache_dir>/prep/<key>.npz; skipped ones go to stderr.
    half: keep each image as float16, as it is loaded (exact: the cache holds float16; half the memory)."""
    return list(iter_prepared(refs, grid, cache_dir, skip_bad, progress, half))


def iter_prepared(refs, grid, cache_dir=None, skip_bad=False, progress=True, half=False, desc="preparing"):
    """prepare_refs one subject at a time: a caller that keeps only what it derives from each image
    (the encoder's latents) holds one image in memory, not the whole data set."""
    folder = Path(cache_dir or default_cache_dir()) / "prep"
    for ref in tqdm(refs, desc=desc, unit="subject", file=sys.stderr, disable=not progress):
        try:
            p = _prepare_cached(ref, grid, folder)
        except DataError as e:
            if not skip_bad:
                raise
            tqdm.write(f"skipped {e}", file=sys.stderr)
            continue
        if half:
            p.image = p.image.astype(np.float16)
        yield p


def _prepare_cached(ref, grid, folder: Path) -> Prepared:
    path = folder / f"{cache_key(ref, grid)}.npz"
    if path.exists():
        try:
            return load_prepared(path)
        except Exception as e:  # a foreign or truncated cache file is rebuilt, never trusted
            tqdm.write(f"rebuilding unreadable cache file {path} ({type(e).__name__})", file=sys.stderr)
    p = prepare_subject(ref.load(), grid)
    save_prepared(path, p)
    # Hand out what a cache read returns, so a first run and a resumed one see the same data.
    p.image = p.image.astype(np.float16).astype(np.float32)
    return p


def prepare_dataset(root, grid, cache_dir=None, skip_bad=False, progress=True, csv_path=None, half=False) -> list:
    """Scan root and prepare every subject (cached); subjects skipped with skip_bad are listed on stderr.
    csv_path: an M&Ms / M&Ms-2 information CSV kept elsewhere (cine.datasets.scan); half: prepare_refs."""
    ds = scan(root, skip_bad=skip_bad, csv_path=csv_path)
    for path, reason in ds.problems:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    prepared = prepare_refs(ds.refs, grid, cache_dir, skip_bad, progress, half)
    if not prepared:
        raise DataError(root, "no usable subject")
    return prepared


def split_ids(ids, val_fraction: float, seed: int) -> tuple:
    """(train_ids, val_ids), deterministic, independent of the order of ids and stable when ids are added.

    Ids are ranked by a hash of (seed, id); the first round(n * val_fraction) are held out, at
    least 1 when n >= 2 and val_fraction > 0, and never all of them.
    """
    ids = sorted(set(ids))
    n = len(ids)
    n_val = 0 if n < 2 or val_fraction <= 0 else min(n - 1, max(1, int(round(n * val_fraction))))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]
