"""Diagnostic: where is the frame-to-frame image change, in real, VAE-decoded real and generated cycles?

`python scripts/image_change.py REAL GENERATED [--weights DIR] [--n 40]` puts every cycle on the VAE's
grid (as `eval --coherence` does) and splits its mean |frame t+1 - frame t| (the coherence figure
"image change / frame") two ways: by band, the change of Gaussian-smoothed frames (sigma 2 pixels, 3 mm
on the cpu grid: moving walls and blood pools) against the rest (texture and noise); and by region, the
heart (every voxel that is RV, MYO or LV in some frame, dilated by 10 mm) against everything else. REAL's
cycles are also decoded by the VAE (its mean, frame by frame). Each figure is the mean over subjects of
the change summed over that part's voxels divided by all voxels, so the parts of a split add up to the
whole. It prints figures and asserts nothing (see weights/EXPERIMENTS.md for measured figures).
Axis vocabulary: cycles (X, Y, Z, T) with T frames in cycle order.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synth4d.cine.datasets import scan
from synth4d.cine.measures import volume_curve
from synth4d.cine.prep import prepare_subject
from synth4d.jobs.evaluate import ed_es_change, full_cycle_mask
from synth4d.nets.pipeline import reconstruct
from synth4d.weights import DIR
from synth4d.weights.checkpoint import load_vae

SIGMA_PX = 2.0
MARGIN_MM = 10.0


def smooth(cycle: np.ndarray) -> np.ndarray:
    """In-plane Gaussian blur (sigma SIGMA_PX pixels, replicate border) of every slice and frame (X, Y, Z, T)."""
    r = int(3 * SIGMA_PX)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / SIGMA_PX) ** 2)
    k = (k / k.sum()).float()
    X, Y, Z, T = cycle.shape
    x = torch.from_numpy(np.ascontiguousarray(cycle.transpose(2, 3, 0, 1))).reshape(Z * T, 1, X, Y)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return x.reshape(Z, T, X, Y).numpy().transpose(2, 3, 0, 1)


def heart_region(labels: np.ndarray, spacing: float) -> np.ndarray:
    """(X, Y, Z) bool: voxels labelled in some frame of labels (X, Y, Z, T), dilated in-plane by MARGIN_MM."""
    r = int(round(MARGIN_MM / spacing))
    any_label = torch.from_numpy((labels > 0).any(axis=3).transpose(2, 0, 1).astype(np.float32))[:, None]
    grown = F.max_pool2d(any_label, 2 * r + 1, stride=1, padding=r)
    return grown[:, 0].numpy().transpose(1, 2, 0) > 0


def parts(cycle: np.ndarray, region: np.ndarray, ed: int, es: int) -> dict:
    """The change of one cycle (X, Y, Z, T), split by band and by region; each part / all voxels; and the
    mean |ES frame - ED frame| of the cycle and of its smoothed frames."""
    step = np.abs(np.roll(cycle, -1, axis=3) - cycle)
    blurred = smooth(cycle)
    low = np.abs(np.roll(blurred, -1, axis=3) - blurred)
    n = step.size
    return {"ED-ES": ed_es_change(cycle, ed, es), "ED-ES smooth": ed_es_change(blurred, ed, es),
            "all": step.sum(dtype=np.float64) / n,
            "smooth": low.sum(dtype=np.float64) / n,
            "heart": step[region].sum(dtype=np.float64) / n,
            "outside": step[~region].sum(dtype=np.float64) / n}


def lv_minimum(labels: np.ndarray, spacing) -> int:
    """ES: the frame of labels (X, Y, Z, T) with the smallest LV volume (as `eval --control` finds it)."""
    return int(np.argmin(volume_curve(labels, spacing)["lv"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("real", type=Path)
    ap.add_argument("generated", type=Path)
    ap.add_argument("--weights", type=Path, default=DIR)
    ap.add_argument("--n", type=int, default=40, help="subjects of each set")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    vae, meta = load_vae(args.weights / "vae.safetensors")
    grid = meta["grid"]
    rows = {"real": [], "decoded real": [], "generated": []}
    for s in scan(args.real).load_each("real"):
        if len(rows["real"]) == args.n:
            break
        p = prepare_subject(s, grid)
        if p.full_mask is None:
            continue
        n = p.n_slices
        labels = p.full_mask[:, :, :n]
        region = heart_region(labels, grid.spacing)
        decoded, _ = reconstruct(vae, p.image, "cpu")
        es = lv_minimum(labels, p.spacing)
        rows["real"].append(parts(p.image[:, :, :n], region, p.ed, es))
        rows["decoded real"].append(parts(decoded[:, :, :n], region, p.ed, es))
    if not rows["real"]:
        raise SystemExit(f"{args.real}: no subject with a full-cycle mask (the phantom's *_4d_gt), which the "
                         "heart region and ES come from")
    for s in scan(args.generated).load_each("generated"):
        if len(rows["generated"]) == args.n:
            break
        p = prepare_subject(s, grid)
        n = p.n_slices
        labels = full_cycle_mask(s, generated=True)
        if labels.shape[:2] != p.image.shape[:2]:
            raise SystemExit(f"{s.path}: generated labels are not on the VAE grid; this diagnostic expects "
                             "`generate`'s output")
        labels = labels[:, :, :n]
        region = heart_region(labels, grid.spacing)
        rows["generated"].append(parts(p.image[:, :, :n], region, 0, lv_minimum(labels, p.spacing)))
    keys = ("all", "smooth", "heart", "outside", "ED-ES", "ED-ES smooth")
    print(f"image change / frame on the VAE grid ({grid.size} x {grid.size} at {grid.spacing:g} mm); smooth: "
          f"Gaussian sigma {SIGMA_PX:g} px; heart: labelled in some frame + {MARGIN_MM:g} mm")
    print("| set | subjects | " + " | ".join(keys) + " | rough (all - smooth) |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    means = {}
    for name, r in rows.items():
        means[name] = {k: float(np.mean([x[k] for x in r])) for k in keys}
        m = means[name]
        print(f"| {name} | {len(r)} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {m['all'] - m['smooth']:.4f} |")
    g, d = means["generated"], means["decoded real"]
    print("generated / decoded real: " + ", ".join(f"{k} {g[k] / d[k]:.2f}" for k in keys)
          + f", rough {(g['all'] - g['smooth']) / (d['all'] - d['smooth']):.2f}")


if __name__ == "__main__":
    main()
