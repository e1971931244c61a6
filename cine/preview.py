"""Pictures of a subject: a mosaic of short-axis slices at ED and ES with the mask outlined (PNG, written
by hand with zlib), and an animated mid-ventricular cine (GIF, through Pillow, an optional extra).

Axis vocabulary: a cine is (X, Y, Z, T), a mask over the cycle (X, Y, Z, T) or per frame (X, Y, Z);
a picture is (H, W, 3) uint8. A slice is drawn as a viewer draws a NIfTI slice without reorienting
it: columns follow X, rows follow Y with its last voxel at the top.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from synth4d.cine import UserError, atomic_write

COLOURS = {1: (60, 140, 255), 2: (40, 220, 90), 3: (255, 70, 60)}   # RV blue, MYO green, LV red (ACDC labels)
MIN_TILE = 160      # tiles are enlarged (nearest neighbour, whole factors) to at least this many pixels
MAX_SLICES = 8


def _grey(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(X, Y) image -> (H, W) uint8 as displayed: columns = X, rows = Y from the top down reversed."""
    g = np.clip((slice2d - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.flipud(g.T).astype(np.uint8)


def _outline(labels2d: np.ndarray) -> np.ndarray:
    """(X, Y) labels -> (H, W) labels on their boundary pixels (4-neighbours of another label), 0 elsewhere."""
    m = np.flipud(labels2d.T)
    edge = np.zeros(m.shape, bool)
    edge[1:] |= m[1:] != m[:-1]
    edge[:-1] |= m[:-1] != m[1:]
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    return np.where(edge, m, 0)


def tile(slice2d, labels2d, lo, hi, scale: int) -> np.ndarray:
    """One slice as an RGB tile with its mask outlined, enlarged `scale` times."""
    rgb = np.repeat(_grey(slice2d, lo, hi)[..., None], 3, axis=2)
    if labels2d is not None:
        edge = _outline(labels2d)
        for label, colour in COLOURS.items():
            rgb[edge == label] = colour
    return np.kron(rgb, np.ones((scale, scale, 1), np.uint8))


def heart_slices(mask3d, n_slices: int) -> list:
    """Up to MAX_SLICES slice indices, evenly spread over those holding heart (all slices without a mask)."""
    z = np.flatnonzero(mask3d.any(axis=(0, 1))) if mask3d is not None and mask3d.any() else np.arange(n_slices)
    if len(z) <= MAX_SLICES:
        return [int(v) for v in z]
    return [int(z[int(round(i * (len(z) - 1) / (MAX_SLICES - 1)))]) for i in range(MAX_SLICES)]


def mosaic(image4d, frames: dict, masks: dict) -> np.ndarray:
    """(H, W, 3) uint8: one row per frame in `frames` (name -> index), one column per heart slice, masks
    (frame index -> (X, Y, Z) labels) outlined where given. Intensities: the 1st-99th percentile of the cine."""
    lo, hi = (float(v) for v in np.percentile(image4d, (1, 99)))
    ref = next((masks[t] for t in frames.values() if t in masks), None)
    zs = heart_slices(ref, image4d.shape[2])
    scale = max(1, -(-MIN_TILE // max(image4d.shape[:2])))
    rows = []
    for t in frames.values():
        tiles = [tile(image4d[:, :, z, t], masks[t][:, :, z] if t in masks else None, lo, hi, scale) for z in zs]
        gap = np.zeros((tiles[0].shape[0], 2, 3), np.uint8)
        rows.append(np.concatenate([x for tl in tiles for x in (tl, gap)][:-1], axis=1))
    gap = np.zeros((2, rows[0].shape[1], 3), np.uint8)
    return np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 picture as a PNG file (8-bit RGB, no filtering, zlib level 6)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def cine_frames(image4d, mask4d, z: int) -> list:
    """The (H, W, 3) tiles of slice z over every frame, mask outlined where mask4d has labels."""
    lo, hi = (float(v) for v in np.percentile(image4d, (1, 99)))
    scale = max(1, -(-MIN_TILE // max(image4d.shape[:2])))
    return [tile(image4d[:, :, z, t], mask4d[:, :, z, t] if mask4d is not None else None, lo, hi, scale)
            for t in range(image4d.shape[3])]


def write_png(path, rgb) -> Path:
    data = png_bytes(rgb)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_gif(path, frames: list, frame_ms: float) -> Path:
    """An animated GIF of (H, W, 3) frames, looping, frame_ms per frame; needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("a .gif preview needs Pillow: pip install 'synth4d[preview]' (a .png needs nothing)") from None
    pictures = [Image.fromarray(f) for f in frames]
    return atomic_write(path, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                                                           duration=max(20, int(round(frame_ms))), loop=0))
