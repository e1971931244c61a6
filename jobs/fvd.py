"""The Fréchet video distance of a generated cine data set against a real one: with Inception-I3D features
(the standard FVD, --i3d weights) or, without them, with features of the trained VAE encoder (fvd_vae).

Axis vocabulary: a cine is (X, Y, Z, T), a clip (one slice over one cycle) (16, X, Y), a batch of
clips for I3D (B, 3, 16, 224, 224), features (N, D). Images are first put on one grid (cine.prep: a
heart-centred crop, intensities per subject from the 0.5/99.5 percentiles to [-1, 1]), so a real
set's field of view does not count as a difference.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from synth4d.cine import UserError
from synth4d.cine.metrics import frechet_distance, gaussian_stats
from synth4d.cine.prep import prepare_subject
from synth4d.nets.i3d import SIZE as I3D_SIZE
from synth4d.nets.pipeline import encode_frames

FVD_FRAMES = 16
POOL = 4              # fvd_vae: posterior means averaged to POOL x POOL in-plane


def cycle_frames(image, ed, n=FVD_FRAMES):
    """(X, Y, Z, T) -> (X, Y, Z, n): the cycle from ED, linearly interpolated at n even phases (periodic)."""
    image = np.roll(image, -ed, axis=3)
    pos = np.arange(n) * image.shape[3] / n
    i0 = np.floor(pos).astype(int)
    w = (pos - i0).astype(np.float32)
    return image[..., i0] * (1 - w) + image[..., (i0 + 1) % image.shape[3]] * w


def _cycles(ds, grid, desc):
    """Per subject: its cycle from ED on grid at 16 phases (X, Y, Z, 16) and its number of real slices."""
    for s in ds.load_each(desc):
        p = prepare_subject(s, grid)
        yield cycle_frames(p.image, p.ed), p.n_slices


@torch.no_grad()
def vae_clip_features(frames, n_slices, vae, device):
    """fvd_vae feature of each slice clip: posterior means (x latent scale) of the 16 frames, averaged to
    POOL x POOL in-plane per latent channel, then their mean and std over the 16 frames: (n, 2 C POOL^2)."""
    model, meta = vae
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(frames, 3, 0)))[:, None]            # (16, 1, X, Y, Z)
    mean = encode_frames(model, x, device, batch=len(x)) * float(meta["scale"])              # (16, C, x, y, Z)
    pooled = F.adaptive_avg_pool3d(mean, (POOL, POOL, mean.shape[4]))[..., :n_slices]        # (16, C, P, P, n)
    per_slice = pooled.permute(4, 0, 1, 2, 3).flatten(2)                                      # (n, 16, C P P)
    return torch.cat([per_slice.mean(1), per_slice.std(1)], dim=1).cpu().numpy()


def fvd_report(real_ds, gen_ds, grid, i3d_features=None, i3d_path=None, vae=None, device="cpu", size=I3D_SIZE) -> dict:
    """The Fréchet distance of clip features, generated vs real and between two halves of real (by subject)."""
    def features(ds, desc):
        per_subject = []
        for frames, n in _cycles(ds, grid, desc):
            if i3d_features is not None:
                clips = np.ascontiguousarray(frames[:, :, :n].transpose(2, 3, 0, 1))  # (n, 16, X, Y)
                per_subject.append(i3d_features.grey_clips(torch.from_numpy(clips), size).numpy())
            else:
                per_subject.append(vae_clip_features(frames, n, vae, device))
        return per_subject

    real = features(real_ds, "FVD features (real)")
    gen = np.concatenate(features(gen_ds, "FVD features (generated)"))
    halves = [np.concatenate(real[0::2]), np.concatenate(real[1::2])] if len(real) >= 2 else []
    real_all = np.concatenate(real)
    if min(len(real_all), len(gen)) < 2:
        raise UserError(f"a Fréchet distance needs at least 2 clips per set; got {len(real_all)} real, "
                        f"{len(gen)} generated")
    enough = len(halves) == 2 and min(len(h) for h in halves) >= 2
    if i3d_features is not None:
        feature = (f"Inception-I3D (Kinetics-400) logits averaged over time, 400-d; weights {i3d_path} "
                   f"({i3d_features.kind}); frames resized to {size} x {size}, grey repeated to 3 channels")
    else:
        c = vae[0].cfg.latent_ch
        feature = (f"NOT FVD: VAE encoder posterior means x latent scale per frame, averaged to {POOL} x {POOL} "
                   f"in-plane per channel ({c} channels), mean and std over the 16 frames: {2 * c * POOL * POOL}-d")
    return {
        "value": frechet_distance(*gaussian_stats(real_all), *gaussian_stats(gen)),
        "real_halves": frechet_distance(*gaussian_stats(halves[0]), *gaussian_stats(halves[1])) if enough else None,
        "protocol": {
            "feature": feature, "frames": FVD_FRAMES,
            "resolution": [size, size] if i3d_features is not None else [grid.size, grid.size],
            "clip": "one short-axis slice over one cardiac cycle from ED, linearly resampled to 16 frames",
            "grid": dataclasses.asdict(grid),
            "intensity": "per subject, 0.5 and 99.5 percentiles to -1 and 1 (cine.prep)",
            "distance": "Fréchet distance of Gaussian fits, float64, eigen-decomposition square root",
            "subjects": {"real": len(real), "generated": len(gen_ds.refs)},
            "clips": {"real": len(real_all), "generated": len(gen)},
            "real_halves": {"split": "subjects alternately, in id order", "clips": [len(h) for h in halves]},
        },
    }
