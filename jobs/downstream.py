"""`synth4d eval --downstream`: does adding synthetic subjects to real training data help a segmenter
on another set (another vendor)?

The compact segmenter (jobs.compact) is fitted per seed twice, with the same steps, batch,
augmentation and seed: on TRAIN's labelled frames alone ("real"), and on those plus SYNTHETIC's
frames, `ratio` synthetic slices per real slice in every batch ("real+synthetic"). Both segment
every labelled frame of TEST (every frame where a full-cycle truth exists, as in the phantom),
from the image alone: the test crop is centred by cine.prep.find_heart_centre, never by the mask,
and the prediction is mapped back to the file's own grid, where Dice and HD95 (mm) are computed
per structure on each 3D frame.

Figures per arm: the mean over TEST of each subject's mean over frames, then mean and sd over
seeds. The paired test: per test subject, the difference of the arms' Dice (mean over structures,
frames and seeds), under a sign-flip permutation test (cine.metrics.paired_permutation_p).

Axis vocabulary: a cine is (X, Y, Z, T); class probabilities (C, X, Y, Z[, T]).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from synth4d.cine import LABELS, UserError
from synth4d.cine.metrics import dice, hd95, paired_permutation_p
from synth4d.cine.prep import prepare_subject, to_source
from synth4d.cine.subject import Subject
from synth4d.jobs.compact import NOT_NNUNET, FitSettings, collect, fit, predict, settings_dict
from synth4d.jobs.realism import has_labels, judge_grid

STRUCTURES = (1, 2, 3)
ARMS = ("real", "real+synthetic")


def _files(ds) -> dict:
    """Resolved path -> subject id of every image and mask file a data set's subjects read (not the
    information CSV or Info.cfg, which sets cut from one tree may share)."""
    return {os.path.realpath(p): ref.id for ref in ds.refs for role, p in ref.files.items() if role != "info"}


def check_sets(train_ds, test_ds, syn_ds=None):
    """One-line errors for empty or unlabelled sets and for a TEST sharing files with TRAIN or SYNTHETIC."""
    for name, ds in (("--train", train_ds), ("--test", test_ds), ("--synthetic", syn_ds)):
        if ds is None:
            continue
        if not ds.refs:
            raise UserError(f"{name} {ds.root}: no subjects")
        if not any(has_labels(r) for r in ds.refs):
            raise UserError(f"{name} {ds.root}: no subject has a mask; {name} needs labelled frames")
    test_files = _files(test_ds)
    for name, ds in (("--train", train_ds), ("--synthetic", syn_ds)):
        if ds is None:
            continue
        shared = sorted(set(test_files) & set(_files(ds)))
        if shared:
            raise UserError(f"--test shares {len(shared)} file(s) with {name}, e.g. {shared[0]} "
                            f"(subject {test_files[shared[0]]}): test subjects must be unseen")


def test_frames(subject) -> dict:
    """frame -> (X, Y, Z) truth of every labelled frame: the full-cycle truth where there is one."""
    if subject.full_mask is not None:
        return {t: subject.full_mask[..., t] for t in range(subject.full_mask.shape[3])}
    return dict(subject.masks)


def segment_subject(models: dict, subject, grid) -> dict:
    """arm -> {frame: (X, Y, Z) labels on the file's grid} for every labelled frame of a subject."""
    frames = sorted(test_frames(subject))
    bare = Subject(subject.id, subject.image, subject.affine, subject.spacing, subject.frame_ms, path=subject.path)
    p = prepare_subject(bare, grid)                                     # centred from the image alone
    out = {}
    for arm, model in models.items():
        n = p.n_slices
        prob = predict(model, p.image[:, :, :n][..., frames])          # (C, X, Y, n, F)
        labels = to_source(prob, p).argmax(axis=0).astype(np.uint8)    # (X, Y, Z, F) source grid
        out[arm] = {t: labels[..., i] for i, t in enumerate(frames)}
    return out


def _score(pred: dict, truth: dict, spacing) -> dict:
    """Per structure: mean Dice and mean finite HD95 over the frames, and the count of undefined HD95."""
    d, h = {c: [] for c in STRUCTURES}, {c: [] for c in STRUCTURES}
    for t, m in truth.items():
        for c, v in dice(pred[t], m, labels=STRUCTURES).items():
            d[c].append(v)
            if (m == c).any() or (pred[t] == c).any():
                h[c].append(hd95(pred[t] == c, m == c, spacing))
    out = {}
    for c in STRUCTURES:
        finite = [v for v in h[c] if np.isfinite(v)]
        out[LABELS[c]] = {"dice": float(np.mean(d[c])), "hd95": float(np.mean(finite)) if finite else None,
                          "hd95_undefined": len(h[c]) - len(finite)}
    return out


def downstream(train_ds, test_ds, syn_ds=None, ratio: float = 1.0, seeds=(0, 1, 2),
               settings: FitSettings = FitSettings(), grid=None, device="cpu") -> dict:
    """The downstream figures (see the module docstring); without syn_ds, the real arm alone (a
    style gap: train on one vendor, test on another)."""
    check_sets(train_ds, test_ds, syn_ds)
    grid = grid or judge_grid(1.5, 96)
    real = collect((prepare_subject(r.load(), grid) for r in train_ds.refs if has_labels(r)), settings.max_frames)
    syn = None
    if syn_ds is not None:
        syn = collect((prepare_subject(r.load(), grid) for r in syn_ds.refs if has_labels(r)), settings.max_frames)
    arms = ARMS if syn is not None else ARMS[:1]
    models = {}
    for seed in seeds:
        s = dataclasses.replace(settings, seed=int(seed))
        models[seed] = {"real": fit(real, s, device=device, desc=f"real, seed {seed}")}
        if syn is not None:
            models[seed]["real+synthetic"] = fit(real, s, synthetic=syn, ratio=ratio, device=device,
                                                 desc=f"real+synthetic, seed {seed}")
    per_subject = {}   # id -> arm -> seed -> structure -> {dice, hd95}
    n_frames = 0
    for subject in test_ds.load_each("downstream test"):
        truth = test_frames(subject)
        if not truth:
            continue
        n_frames += len(truth)
        per_subject[subject.id] = {arm: {} for arm in arms}
        for seed, m in models.items():
            for arm, pred in segment_subject(m, subject, grid).items():
                per_subject[subject.id][arm][seed] = _score(pred, truth, subject.spacing)
    if not per_subject:
        raise UserError(f"--test {test_ds.root}: no subject has a labelled frame")
    return _summarise(per_subject, arms, seeds) | {
        "test": {"subjects": len(per_subject), "frames": n_frames, "path": str(test_ds.root)},
        "train": {"path": str(train_ds.root), "subjects": len(real.ids), "slices": len(real)},
        "synthetic": None if syn is None else {"path": str(syn_ds.root), "subjects": len(syn.ids),
                                               "slices": len(syn), "ratio": ratio},
        "settings": {"fit": settings_dict(settings), "seeds": [int(s) for s in seeds],
                     "grid": dataclasses.asdict(grid)},
        "segmenter": NOT_NNUNET}


def _summarise(per_subject: dict, arms, seeds) -> dict:
    names = [LABELS[c] for c in STRUCTURES]
    ids = sorted(per_subject)

    def set_mean(arm, seed, name, key):  # mean over test subjects of one seed's figure
        v = [per_subject[i][arm][seed][name][key] for i in ids]
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else None

    out = {"arms": {}}
    for arm in arms:
        out["arms"][arm] = {}
        for name in names:
            row = {}
            for key in ("dice", "hd95"):
                vals = [set_mean(arm, s, name, key) for s in seeds]
                vals = [v for v in vals if v is not None]
                row[key] = {"mean": float(np.mean(vals)) if vals else None,
                            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "per_seed": vals}
            out["arms"][arm][name] = row
    if len(arms) == 2:
        a, b = arms
        diff = {}
        for name in names:
            d = [np.mean([per_subject[i][b][s][name]["dice"] - per_subject[i][a][s][name]["dice"] for s in seeds])
                 for i in ids]
            diff[name] = {"dice": out["arms"][b][name]["dice"]["mean"] - out["arms"][a][name]["dice"]["mean"],
                          "hd95": _sub(out["arms"][b][name]["hd95"]["mean"], out["arms"][a][name]["hd95"]["mean"]),
                          "p": paired_permutation_p(d)}
        overall = [np.mean([per_subject[i][b][s][n]["dice"] - per_subject[i][a][s][n]["dice"]
                            for s in seeds for n in names]) for i in ids]
        out["difference"] = diff
        out["paired_test"] = {"mean_dice_difference": float(np.mean(overall)), "p": paired_permutation_p(overall),
                              "subjects": len(ids),
                              "test": "two-sided sign-flip permutation test over test subjects of the Dice "
                                      "difference (real+synthetic - real), mean over structures, frames and seeds"}
    return out


def _sub(a, b):
    return None if a is None or b is None else a - b
