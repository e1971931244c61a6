"""`synth4d eval --realism`: do generated images show the structures their masks say, to a judge
that never saw our models? And are they as sharp as real frames?

The judge is the compact segmenter (jobs.compact), fitted on the labelled frames of part of REAL
only, on the generated set's grid. It then segments three kinds of frames, each scored by Dice per
structure against its own mask:
  real           the held-out part of REAL (the reference: what the judge achieves on real images);
  reconstructed  the same held-out frames after a VAE round trip on the VAE's own grid; a VAE on another
                 grid has its round trips resampled onto the judge's, so the row then also holds
                 what the VAE's grid loses (a coarse grid thins the RV wall and the myocardium);
  generated      GENERATED's frames (up to FitSettings.max_frames per subject) against the generated masks.
Realism of a kind = its Dice / the real Dice, per structure. Sharpness of a kind = its mean
high-frequency energy (cine.metrics.high_frequency_energy, sigma 1 voxel) in a box around the heart
(the mask's extent plus 10 mm) / the same of the held-out real frames. Both are 1.0 for images
as good as the real ones, lower for blurred or wrong ones.

Axis vocabulary: a frame is (X, Y, Z) on the grid; slices (N, X, Y) as in jobs.compact.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from synth4d.cine import LABELS, UserError
from synth4d.cine.metrics import dice, high_frequency_energy
from synth4d.cine.prep import _resample, _weights, prepare_subject, split_ids
from synth4d.jobs.compact import (NOT_NNUNET, FitSettings, Slices, collect, fit, frames_with_labels, from_arrays,
                                  predict, settings_dict)
from synth4d.nets.config import GridConfig
from synth4d.nets.pipeline import reconstruct_frames

STRUCTURES = (1, 2, 3)
MARGIN_MM = 10.0
HELD_OUT = 0.25


def has_labels(ref) -> bool:
    """Whether a cine.subject.SubjectRef has any mask file (a frame mask, a 4D mask or a full-cycle truth)."""
    return any(k.startswith("mask") or k == "full_mask" for k in ref.files)


def judge_grid(spacing: float, size: int) -> GridConfig:
    """The segmenter's grid: `spacing`, the size rounded up to a multiple of 8 (its three poolings)."""
    return GridConfig(spacing=float(spacing), size=-(-int(size) // 8) * 8, slices=32)


def heart_box(labels: np.ndarray, spacing: float) -> np.ndarray:
    """Boolean (N, X, Y) box over every slice: the in-plane extent of labels > 0 in any slice, plus MARGIN_MM."""
    region = np.zeros(labels.shape, dtype=bool)
    xs, ys = np.nonzero(labels.any(axis=0))
    if len(xs):
        m = int(round(MARGIN_MM / spacing))
        region[:, max(0, xs.min() - m): xs.max() + m + 1, max(0, ys.min() - m): ys.max() + m + 1] = True
    return region


def score(model, slices: Slices, spacing: float) -> dict:
    """Dice per structure of every frame (3D over its slices), and its high-frequency energy near the heart."""
    prob = predict(model, np.moveaxis(slices.images, 0, 2))                     # (C, X, Y, N)
    pred = np.moveaxis(prob.argmax(axis=0).astype(np.uint8), 2, 0)             # (N, X, Y)
    per = {c: [] for c in STRUCTURES}
    energy = []
    for _, _, k in slices.frames():
        for c, d in dice(pred[k], slices.labels[k], labels=STRUCTURES).items():
            per[c].append(d)
        box = heart_box(slices.labels[k], spacing)
        img = np.moveaxis(slices.images[k], 0, 2)                              # (X, Y, n)
        energy.append(high_frequency_energy(img, np.moveaxis(box, 0, 2)))
    energy = [e for e in energy if np.isfinite(e)]
    return {"dice": {LABELS[c]: float(np.mean(v)) if v else None for c, v in per.items()},
            "hf_energy": float(np.mean(energy)) if energy else None, "frames": len(per[1]),
            "subjects": len(slices.ids)}


def _reconstructed(vae, refs, grid, device, max_frames) -> Slices:
    """The labelled frames of refs after a VAE round trip, with their true masks, as slices."""
    images, labels, subject, frame, ids = [], [], [], [], []
    for ref in refs:
        p = prepare_subject(ref.load(), grid)
        ts = [t for t, _ in frames_with_labels(p, max_frames)]
        if not ts:
            continue
        for t, image, _, truth, _ in reconstruct_frames(vae, p, device, frames=ts):
            images.append(np.moveaxis(image, 2, 0))
            labels.append(np.moveaxis(truth, 2, 0))
            subject += [len(ids)] * image.shape[2]
            frame += [t] * image.shape[2]
        ids.append(p.id)
    return from_arrays(images, labels, subject, frame, ids)


def _reconstructed_elsewhere(vae, refs, vgrid, grid, device, max_frames) -> Slices:
    """As _reconstructed, for a VAE whose grid `vgrid` is not the judge's `grid`: each round trip is
    resampled once (linearly) from the VAE's crop onto the judge's crop of the same subject, and its
    intensities mapped from the VAE grid's normalisation to the judge grid's; judge slices outside the
    VAE's slice block are left out of the row."""
    images, labels, subject, frame, ids = [], [], [], [], []
    for ref in refs:
        s = ref.load()
        pj, pv = prepare_subject(s, grid), prepare_subject(s, vgrid)
        chosen = frames_with_labels(pj, max_frames)
        if not chosen:
            continue
        ts = [t for t, _ in chosen]
        recon = np.stack([im for _, im, _, _, _ in reconstruct_frames(vae, pv, device, frames=ts)], axis=3)
        (jx, jy), (vx, vy) = pj.src["origin"], pv.src["origin"]       # source voxels, canonical axes
        (sjx, sjy), (svx, svy) = pj.src["scale"], pv.src["scale"]
        wx = _weights(grid.size, vgrid.size, (jx - vx) / svx, sjx / svx)
        wy = _weights(grid.size, vgrid.size, (jy - vy) / svy, sjy / svy)
        on_judge = _resample(recon, wx, wy, bg=-1.0)                    # (X, Y, n_v, T') judge crop
        (lv, hv), (lj, hj) = pv.src["intensity"], pj.src["intensity"]
        on_judge = np.clip(((on_judge + 1) / 2 * (hv - lv) + lv - lj) / max(hj - lj, 1e-6) * 2 - 1, -1, 1)
        shift = pj.src["z0"] - pv.src["z0"]                              # judge slice k = VAE slice k + shift
        ks = [k for k in range(pj.n_slices) if 0 <= k + shift < pv.n_slices]
        if not ks:
            continue
        for i, (t, mask) in enumerate(chosen):
            images.append(np.moveaxis(on_judge[:, :, [k + shift for k in ks], i], 2, 0))
            labels.append(np.moveaxis(mask[:, :, ks], 2, 0))
            subject += [len(ids)] * len(ks)
            frame += [t] * len(ks)
        ids.append(pj.id)
    return from_arrays(images, labels, subject, frame, ids)


def realism(real_ds, gen_ds, grid: GridConfig, settings: FitSettings, vae=None, device="cpu") -> dict:
    """The realism and sharpness figures of gen_ds against real_ds on `grid` (see the module docstring);
    vae = (model, meta) adds the reconstructed row (see the module docstring). gen_ds None: the real and
    reconstructed rows alone."""
    grid = judge_grid(grid.spacing, grid.size)
    labelled = [r for r in real_ds.refs if has_labels(r)]
    if len(labelled) < 2:
        raise UserError(f"--realism needs at least 2 labelled subjects in {real_ds.root} (found {len(labelled)}): "
                        "the judge is fitted on some and checked on the others")
    train_ids, test_ids = split_ids([r.id for r in labelled], HELD_OUT, settings.seed)
    by_id = {r.id: r for r in labelled}

    def prepared(refs):
        return (prepare_subject(r.load(), grid) for r in refs)

    train = collect(prepared([by_id[i] for i in train_ids]), settings.max_frames)
    test = collect(prepared([by_id[i] for i in test_ids]), settings.max_frames)
    gen = collect(prepared(gen_ds.refs), settings.max_frames) if gen_ds is not None else None
    if gen is not None and len(gen) == 0:
        raise UserError(f"--realism: no generated subject in {gen_ds.root} has a mask to score against")
    model = fit(train, settings, device=device, desc="realism judge")
    rows = {"real": score(model, test, grid.spacing)}
    note = None
    if vae is not None:
        model_vae, meta = vae
        vgrid = meta["grid"]
        refs = [by_id[i] for i in test_ids]
        if abs(vgrid.spacing - grid.spacing) < 1e-6 and vgrid.size == grid.size:
            slices = _reconstructed(model_vae, refs, vgrid, device, settings.max_frames)
        else:
            slices = _reconstructed_elsewhere(model_vae, refs, vgrid, grid, device, settings.max_frames)
            note = (f"reconstructed on the VAE's grid ({vgrid.size} x {vgrid.size} at {vgrid.spacing:g} mm), "
                    f"scored on the judge's: the row includes that grid's loss")
        rows["reconstructed"] = score(model, slices, grid.spacing)
    if gen is not None:
        rows["generated"] = score(model, gen, grid.spacing)
    ref = rows["real"]
    for row in rows.values():
        row["realism"] = {s: (d / ref["dice"][s] if d is not None and ref["dice"][s] else None)
                          for s, d in row["dice"].items()}
        row["sharpness"] = (row["hf_energy"] / ref["hf_energy"]
                            if row["hf_energy"] is not None and ref["hf_energy"] else None)
    return {"rows": rows, "judge": {"segmenter": NOT_NNUNET, "fit": settings_dict(settings),
                                    "trained_on": {"subjects": len(train.ids), "slices": len(train)},
                                    "held_out": test_ids},
            "grid": dataclasses.asdict(grid), "note": note,
            "protocol": "judge fitted on REAL's labelled frames (held-out part excluded), on the generated grid "
                        "(without GENERATED: --seg-spacing, --seg-size); "
                        "realism = Dice / Dice of held-out real frames, per structure; sharpness = high-frequency "
                        f"energy (image - Gaussian(1 voxel)) in the heart box (+{MARGIN_MM:g} mm) / that of "
                        "held-out real frames"}
