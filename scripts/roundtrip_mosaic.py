"""Picture what a VAE keeps: a labelled subject's ED and ES frames on the VAE's grid, then after round trips.

`python scripts/roundtrip_mosaic.py SUBJECT OUT.png --weights DIR [--weights DIR2 ...]` writes a PNG with
two rows per frame set: the subject prepared on the first VAE's grid (what that VAE is trained to
reproduce) and each VAE's round trip, every one with the decoded mask outlined (the real rows: the true
mask). A VAE on another grid has its own real rows. Figures: `synth4d eval REAL --recon --realism`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from synth4d.cine.datasets import scan
from synth4d.cine.preview import mosaic, write_png
from synth4d.cine.prep import prepare_subject
from synth4d.nets.pipeline import reconstruct
from synth4d.weights.checkpoint import load_vae


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("subject", type=Path, help="an ACDC-layout subject folder (its parent is scanned)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--weights", type=Path, action="append", required=True, help="folder with vae.safetensors")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ref = next(r for r in scan(args.subject.parent).refs if r.id == args.subject.name)
    subject = ref.load()
    blocks = []
    for folder in args.weights:
        model, meta = load_vae(folder / "vae.safetensors", torch.device("cpu"))
        p = prepare_subject(subject, meta["grid"])
        ts = [p.ed, p.es]
        image, prob = reconstruct(model, p.image[..., ts], torch.device("cpu"))
        truth = {i: p.masks[t] for i, t in enumerate(ts)}
        decoded = {i + 2: prob[..., i].argmax(axis=0).astype(np.uint8) for i in range(2)}
        both = np.concatenate([p.image[..., ts], image], axis=3)                           # (X, Y, Z, 4)
        blocks.append(mosaic(both, {"ED": 0, "ES": 1, "ED round trip": 2, "ES round trip": 3}, {**truth, **decoded}))
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 6), (0, width - b.shape[1]), (0, 0))) for b in blocks]
    print(write_png(args.out, np.concatenate(blocks, axis=0)))


if __name__ == "__main__":
    main()
