"""Encode a data set with a trained VAE, once (cached): the latents both diffusion stages train on.

Axis vocabulary: a subject's latents are (T, C, X, Y, Z): cardiac frame, latent channel, the
in-plane latent grid and the slices. Latents are posterior means times the VAE's measured scale,
so they have unit standard deviation over the training frames.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synth4d.cine import DataError, atomic_write
from synth4d.cine.datasets import scan
from synth4d.cine.prep import default_cache_dir, iter_prepared
from synth4d.nets.device import select_device
from synth4d.nets.pipeline import encode_frames
from synth4d.weights.checkpoint import load_vae

LATENT_VERSION = 2
DEFAULT_RR_MS = 1000.0  # cycle length when a data set does not record the frame duration


@dataclass
class LatentSubject:
    id: str
    z: np.ndarray               # (T, C, X, Y, Z) float32, scaled posterior means
    ed: int
    es: int | None
    n_slices: int
    dx: str | None
    slice_mm: float
    rr_ms: float
    measures: dict = field(default_factory=dict)   # lvedv ... rvef from the source ED/ES masks, if labelled

    @property
    def frames(self) -> int:
        return self.z.shape[0]

    def values(self) -> dict:
        """The subject's condition values: its measures plus the acquisition figures and the ES phase
        (ES after ED as a fraction of the cycle) the priors also model."""
        es_phase = None if self.es is None or self.es == self.ed else ((self.es - self.ed) % self.frames) / self.frames
        return {**self.measures, "slices": float(self.n_slices), "slice_mm": self.slice_mm, "rr_ms": self.rr_ms,
                "dx": self.dx, "es_phase": es_phase}


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _latent_path(folder: Path, s) -> Path:
    """The cache file of one prepared subject: named by its image's content, so renamed or added subjects
    reuse what is already encoded and a changed image is encoded afresh."""
    h = hashlib.blake2b(np.ascontiguousarray(s.image, dtype=np.float16).tobytes(), digest_size=16)
    h.update(json.dumps([LATENT_VERSION, s.image.shape]).encode())
    return folder / f"{h.hexdigest()}.npy"


def _read_latent(path: Path, frames: int):
    """The cached latent at `path`, or None if it is missing or unreadable (then it is encoded afresh)."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):   # EOFError: an empty file
        return None
    return z.astype(np.float32) if z.ndim == 5 and z.shape[0] == frames else None


@torch.no_grad()
def encode_dataset(data, vae_path, cache=None, skip_bad=False, device="auto", batch=16, csv_path=None) -> tuple[list, dict]:
    """-> (list[LatentSubject], vae meta). Each subject's latent is cached under cache/latents/<VAE>/,
    so adding subjects to a data set encodes only the new ones."""
    dev = select_device(device)
    vae, meta = load_vae(vae_path, dev)
    if "scale" not in meta or "grid" not in meta:
        raise DataError(vae_path, "VAE checkpoint lacks its measured latent scale or grid; retrain or pass a finished run")
    ds = scan(data, skip_bad=skip_bad, csv_path=csv_path)
    for path, reason in ds.problems:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    folder = Path(cache or default_cache_dir()) / "latents" / _file_digest(vae_path)
    folder.mkdir(parents=True, exist_ok=True)
    out, scale = [], float(meta["scale"])
    # One prepared image at a time: 800 phantom subjects held at once took 12 GB.
    for s in iter_prepared(ds.refs, meta["grid"], cache, skip_bad, desc="encoding"):
        path = _latent_path(folder, s)
        z = _read_latent(path, s.image.shape[3])
        if z is None:
            frames = torch.from_numpy(np.ascontiguousarray(np.moveaxis(s.image, 3, 0)))[:, None]  # (T, 1, X, Y, Z)
            z16 = (encode_frames(vae, frames, dev, batch) * scale).numpy().astype(np.float16)      # (T, C, x, y, Z)
            atomic_write(path, lambda tmp: np.save(tmp, z16))   # tmp keeps the .npy suffix, so np.save adds none
            # Rounded as the cache stores it, so a run reading the cache sees exactly what the first run saw.
            z = z16.astype(np.float32)
        rr = s.frame_ms * s.image.shape[3] if s.frame_ms else DEFAULT_RR_MS
        measures = {k: float(v) for k, v in s.measures.items() if v is not None and math.isfinite(v)}
        out.append(LatentSubject(s.id, z, s.ed, s.es, s.n_slices, s.dx, float(s.spacing[2]), float(rr), measures))
    if not out:
        raise DataError(data, "no usable subject")
    return out, meta
