"""Diagnostic: the motion model animating REAL anatomy, to separate its error from the static stage's.

`python scripts/motion_on_real.py heldout/ [--weights DIR] [--n 10]` encodes the first N subjects of a
labelled data set with the VAE, runs the motion model on each subject's real ED latent with its
true systolic priors (as `generate` does: DDIM, guidance, keyframes on the cycle), decodes, and
prints LVEF / RVEF agreement with the source masks next to the same figures for the VAE's decoding
of the subject's real latents. It asserts nothing (see weights/EXPERIMENTS.md for measured figures).
Axis vocabulary: latents (T, C, X, Y, Z) with T frames in cycle order from ED.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from synth4d.cine.measures import ejection_fraction, volume_curve
from synth4d.cine.metrics import pearson
from synth4d.jobs.encode import encode_dataset
from synth4d.nets.conditions import cond_tensors
from synth4d.nets.pipeline import periodic_interpolate
from synth4d.weights import DIR
from synth4d.weights.checkpoint import load_chain


def efs(labels, spacing) -> tuple:
    """(LVEF, RVEF) of a decoded cycle (X, Y, Z, T), ED = frame 0, ES = the LV volume minimum."""
    curves = volume_curve(labels, spacing)
    es = int(np.argmin(curves["lv"]))
    return ejection_fraction(curves["lv"][0], curves["lv"][es]), ejection_fraction(curves["rv"][0], curves["rv"][es])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--weights", type=Path, default=DIR)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--keyframes", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()

    chain = load_chain(args.weights, "cpu")
    grid = chain.grid
    subjects, _ = encode_dataset(args.data, args.weights / "vae.safetensors", cache=args.cache)
    subjects = [s for s in subjects if "lvef" in s.measures and "rvef" in s.measures][: args.n]
    rows = {"true": [], "vae": [], "motion": []}
    norm_ratio, change = [], {"vae": [], "motion": []}
    for i, s in enumerate(subjects):
        order = [(s.ed + k) % s.frames for k in range(s.frames)]
        z_real = torch.from_numpy(s.z[order])                                              # (T, C, X, Y, Z)
        z_ed = z_real[:1]
        cond = cond_tensors([s.values()], chain.motion_norm, chain.dx_vocab)
        K = args.keyframes
        keys = chain.sample_motion(z_ed, s.n_slices, cond, [k / K for k in range(K)], torch.Generator().manual_seed(i),
                                   args.steps, args.guidance)                              # (K, C, X, Y, Z)
        z_gen = z_ed + periodic_interpolate(keys - z_ed, [t / s.frames for t in range(s.frames)])
        spacing = (grid.spacing, grid.spacing, s.slice_mm)
        rows["true"].append((s.measures["lvef"], s.measures["rvef"]))
        for name, z in (("vae", z_real), ("motion", z_gen)):
            image, labels = chain.decode(z)                                                # (X, Y, Z', T)
            rows[name].append(efs(labels[:, :, : s.n_slices].numpy(), spacing))
            img = image[:, :, : s.n_slices].numpy()
            change[name].append(np.abs(np.roll(img, -1, axis=3) - img).mean())
        real_slices = (z_real - z_ed)[..., : s.n_slices]
        norm_ratio.append(float((z_gen - z_ed)[..., : s.n_slices].norm() / real_slices.norm()))
        print(f"{s.id}: true LVEF {rows['true'][-1][0]:.1f} vae {rows['vae'][-1][0]:.1f} "
              f"motion {rows['motion'][-1][0]:.1f}", file=sys.stderr)

    true = np.array(rows["true"])
    print(f"{len(subjects)} subjects of {args.data}, weights {args.weights}")
    for name in ("vae", "motion"):
        got = np.array(rows[name])
        for j, what in enumerate(("LVEF", "RVEF")):
            err = got[:, j] - true[:, j]
            print(f"{name:6s} {what}: r {pearson(true[:, j], got[:, j]):.3f}  MAE {np.abs(err).mean():.1f}  "
                  f"bias {err.mean():+.1f}")
        print(f"{name:6s} image change per frame {np.mean(change[name]):.4f}")
    print(f"motion residual norm / real: {np.mean(norm_ratio):.2f}")


if __name__ == "__main__":
    main()
