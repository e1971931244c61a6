"""Segment 4D cines with the VAE's mask decoder and report the ventricular volume curves.

Axis vocabulary: a cine and its mask are (X, Y, Z, T) on the input's own voxel grid; on the
VAE grid a frame batch is (B, 1, X, Y, Z) and class probabilities are (C, X, Y, Z, T).
Each input is resampled to the checkpoint's grid (heart-centred crop), segmented frame by
frame from the posterior mode, and the probabilities are mapped back to the input's grid
before the argmax, so the written mask has the input's shape and geometry exactly.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from synth4d.cine import DataError, UserError
from synth4d.cine.measures import ejection_fraction, volume_curve
from synth4d.cine.nifti import peek, read, write
from synth4d.cine.prep import prepare_image, to_source
from synth4d.nets.pipeline import reconstruct
from synth4d.weights import DIR
from synth4d.weights.checkpoint import load_vae

SUFFIXES = (".nii.gz", ".nii")
DERIVED = re.compile(r"(_gt|_mask|_frame\d+)$")  # masks and single frames beside the cines (ACDC, our outputs)


def _stem(path: Path) -> str:
    name = path.name
    return next((name[:-len(s)] for s in SUFFIXES if name.endswith(s)), name)


def _plan(image: Path, out: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a file to a file (or into a folder), a folder's cines into a folder.

    In a folder, files named like masks or single frames (*_gt, *_mask, *_frameNN) are not inputs.
    """
    image, out = Path(image), Path(out)
    if image.is_dir():
        inputs = sorted(p for p in image.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.name.endswith(SUFFIXES) and not DERIVED.search(_stem(p)))
        if not inputs:
            raise UserError(f"no NIfTI files (.nii, .nii.gz) in {image}")
        if out.name.endswith(SUFFIXES):
            raise UserError(f"{image} is a folder: OUT must be a folder, not the file name {out.name}")
        return [(p, out / f"{_stem(p)}_mask.nii.gz") for p in inputs]
    if out.name.endswith(SUFFIXES):
        return [(image, out)]
    return [(image, out / f"{_stem(image)}_mask.nii.gz")]


def segment(image, out, weights=None, device="auto", overwrite=False):
    """Segment each 4D cine in `image` (a file or a folder) into `out`; yields one result dict per input.

    Each dict holds input, mask (the written path), lvedv/lvesv/rvedv/rvesv (mL), lvef/rvef (%),
    ed/es (0-based frames of largest/smallest LV volume) and lv_curve/rv_curve (mL per frame).
    All or nothing: every input's header and every output place is checked before the model runs, and
    the masks are written only once every input has been segmented, so a bad file among many leaves
    no output behind (and the same command runs again once it is fixed).
    """
    path = Path(weights) if weights is not None else DIR / "vae.safetensors"
    if not path.is_file():
        raise UserError(f"no shipped VAE weights yet ({path}); pass --weights path/to/vae.safetensors")
    plan = _plan(image, out)
    existing = [str(dest) for _, dest in plan if dest.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
                        "pass --overwrite to replace")
    for src_path, _ in plan:
        peek(src_path, ndim=4)
    _check_places(plan)
    model, meta = load_vae(path, device)
    if "grid" not in meta:
        raise DataError(path, "VAE checkpoint lacks its training grid; use one written by synth4d train-vae")
    dev = next(model.parameters()).device
    masks = []
    for src_path, dest in plan:
        cine, geom = read(src_path, ndim=4)
        prepared = prepare_image(cine, geom, meta["grid"], id=_stem(src_path))
        _, prob = reconstruct(model, prepared.image, dev)                 # (C, X, Y, Z, T) on the grid
        masks.append((to_source(prob, prepared).argmax(axis=0).astype(np.uint8), geom))  # (X, Y, Z, T), input grid
    for (src_path, dest), (mask, geom) in zip(plan, masks):
        try:
            write(dest, mask, geom, kind="mask")
        except OSError as e:
            raise DataError(dest, f"cannot write ({e.strerror or e})") from None
        curves = volume_curve(mask, geom.spacing)
        lv, rv = curves["lv"], curves["rv"]
        ed, es = int(np.argmax(lv)), int(np.argmin(lv))
        yield {"input": str(src_path), "mask": str(dest),
               "lvedv": float(lv[ed]), "lvesv": float(lv[es]), "lvef": ejection_fraction(lv[ed], lv[es]),
               "rvedv": float(rv[ed]), "rvesv": float(rv[es]), "rvef": ejection_fraction(rv[ed], rv[es]),
               "ed": ed, "es": es, "lv_curve": [float(v) for v in lv], "rv_curve": [float(v) for v in rv]}


def _check_places(plan) -> None:
    """Every output can be written: no folder where a file goes, no file where a folder goes, writable."""
    for _, dest in plan:
        if dest.is_dir():
            raise UserError(f"{dest} is a folder; name the mask file, or give a folder to write into")
        folder = next((p for p in [dest.parent, *dest.parent.parents] if p.exists()), None)
        if folder is not None and not folder.is_dir():
            raise UserError(f"{folder} is a file, so {dest} cannot be written")
        if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
            raise DataError(folder, "cannot write there (permission denied)")
