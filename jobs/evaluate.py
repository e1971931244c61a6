"""`synth4d eval`: a generated data set against a real one — FVD (or fvd_vae, jobs.fvd), controllability,
temporal coherence, image-mask agreement — and the VAE's reconstruction of the real set; with the
compact segmenter fitted on real frames, realism and sharpness (jobs.realism) and the downstream
gain (jobs.downstream); and memorisation (jobs.memorisation). The readable table of the result is
jobs.report's.

Axis vocabulary: a cine is (X, Y, Z, T), a mask over the cycle (X, Y, Z, T), a clip (one slice
over one cycle) (16, X, Y), a batch of clips for I3D (B, 3, 16, 224, 224), features (N, D).

Both folders are data sets cine.datasets reads; a generated one also has the manifest.csv that
`synth4d generate` writes (requested_<k> per subject). Images for FVD and the image-coherence
figures are first put on one grid (cine.prep: a heart-centred crop, intensities per subject from
the 0.5/99.5 percentiles to [-1, 1]), so a real set's field of view does not count as a difference.
"""
from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth4d.cine import LABELS, DataError, UserError
from synth4d.cine.datasets import scan
from synth4d.cine.diagnosis import CRITERIA, NOT_CHECKED, meets
from synth4d.cine.measures import MEASURES, clinical_measures, volume_curve, wall_thickness
from synth4d.cine.metrics import (bias, components_per_slice, dice, frame_change, hd95, mae, pearson, psnr, ssim,
                                  temporal_smoothness)
from synth4d.cine.prep import prepare_subject, to_source
from synth4d.jobs.compact import FitSettings
from synth4d.jobs.downstream import downstream as run_downstream
from synth4d.jobs.fvd import fvd_report
from synth4d.jobs.memorisation import memorisation as run_memorisation
from synth4d.jobs.realism import judge_grid
from synth4d.jobs.realism import realism as run_realism
from synth4d.jobs.report import clean
from synth4d.nets.config import GridConfig
from synth4d.nets.device import select_device
from synth4d.nets.pipeline import reconstruct, reconstruct_frames
from synth4d.weights import DIR
from synth4d.weights.checkpoint import load_vae

MAX_SLICES = 32       # more than any short-axis stack: FVD and coherence see every slice
STRUCTURES = (1, 2, 3)
COHERENCE = ("roughness: mean |second difference| / range of a periodic curve, lower is smoother, higher with "
             "fewer frames (compare sets with equal frame counts); image change: mean |frame t+1 - frame t| "
             "on the common grid, intensities in [-1, 1]; ED-ES change: mean |ES frame - ED frame| on that grid, "
             "how far systole moves the image (one frame pair: noise drawn anew per frame counts once, not once per "
             "frame); ED offset: distance of the LV maximum from the ED "
             "frame, ES phase: ES after ED (generated: LV minimum; real: metadata), as fractions of the cycle, its "
             "sd, a robust sd (1.4826 x median absolute deviation) and the count more than 0.15 from the median; "
             "one component: fraction of slices x frames holding a structure where it is one 4-connected piece "
             "(real: full-cycle masks, else the labelled frames)")


def evaluate(real, generated=None, fvd=False, control=False, coherence=False, recon=False, agreement=False,
             realism=False, memorisation=False, heldout=None, downstream=False, train=None, synthetic=None, test=None,
             ratio=1.0, seeds=3, seg_steps=FitSettings.steps, seg_spacing=1.5, seg_size=96, seed=0,
             i3d=None, i3d_torchscript=False, weights=None, device="auto") -> dict:
    """Every requested metric (none requested: all that apply, except the fitted ones: realism,
    memorisation and downstream) as a JSON-serialisable dict."""
    fit_settings = FitSettings(steps=seg_steps, seed=seed)
    if downstream:
        if fvd or control or coherence or recon or agreement or realism or memorisation:
            raise UserError("--downstream runs alone: give its sets with --train, --synthetic and --test")
        return clean({"downstream": _downstream(train or real, synthetic or generated, test, ratio, seeds,
                                                fit_settings, judge_grid(seg_spacing, seg_size), device)})
    if real is None:
        raise UserError("eval needs REAL, a data set to compare against (GENERATED is optional)")
    real_ds = scan(real)
    gen_ds = scan(generated) if generated is not None else None
    manifest = _manifest(generated) if generated is not None else None
    vae_path = Path(weights or DIR) / "vae.safetensors"
    if memorisation and gen_ds is None:
        raise UserError("--memorisation needs a GENERATED set beside REAL; give both folders")
    if realism and gen_ds is None and not vae_path.is_file():
        raise UserError(f"--realism needs a GENERATED set, or a VAE to score round trips of REAL on its grid "
                        f"(no vae.safetensors in {vae_path.parent}; pass --weights)")
    if memorisation and not vae_path.is_file():
        raise UserError(f"--memorisation needs a VAE: no vae.safetensors in {vae_path.parent}; pass --weights")
    if not (fvd or control or coherence or recon or agreement or realism or memorisation):
        fvd = gen_ds is not None and (i3d is not None or vae_path.is_file())
        control = coherence = manifest is not None
        recon = vae_path.is_file()
        agreement = gen_ds is not None and vae_path.is_file()
        if not (fvd or control or coherence or recon):
            raise UserError(f"nothing to evaluate: give a GENERATED set (FVD needs --i3d or a VAE), or a VAE for "
                            f"--recon (none at {vae_path}; pass --weights)")
    if (fvd or control or coherence or agreement) and gen_ds is None:
        raise UserError("--fvd, --control, --coherence and --agreement need a GENERATED set beside REAL; "
                        "give both folders")
    if (control or coherence) and manifest is None:
        raise UserError(f"{generated} has no manifest.csv: --control and --coherence need a set made by "
                        "`synth4d generate`")
    if (recon or agreement or (fvd and i3d is None)) and not vae_path.is_file():
        what = "--recon" if recon else "--agreement" if agreement else "--fvd without --i3d (fvd_vae)"
        raise UserError(f"{what} needs a VAE: no vae.safetensors in {vae_path.parent}; pass --weights")

    dev = select_device(device)
    vae = None
    if recon or agreement or memorisation or (fvd and i3d is None) or (realism and vae_path.is_file()):
        vae = load_vae(vae_path, dev)
    result = {"real": {"path": str(real), "layout": real_ds.layout, "subjects": len(real_ds.refs)}}
    if gen_ds is not None:
        result["generated"] = {"path": str(generated), "layout": gen_ds.layout, "subjects": len(gen_ds.refs),
                               "manifest": manifest is not None}
    grid = _generated_grid(gen_ds) if gen_ds is not None else None
    if fvd and i3d is not None:
        from synth4d.nets.i3d import load_i3d
        result["fvd"] = fvd_report(real_ds, gen_ds, grid, i3d_features=load_i3d(i3d, dev, allow_torchscript=i3d_torchscript), i3d_path=i3d)
    elif fvd:
        result["fvd_vae"] = fvd_report(real_ds, gen_ds, vae[1]["grid"], vae=vae, device=dev)
    if control:
        result["control"] = controllability(gen_ds, manifest)
    if coherence:
        result["coherence"] = {"real": coherence_stats(real_ds, grid, generated=False),
                               "generated": coherence_stats(gen_ds, grid, generated=True), "protocol": COHERENCE}
    if recon:
        result["recon"] = reconstruction(real_ds, *vae, dev, vae_path)
    if agreement:
        result["agreement"] = image_mask_agreement(gen_ds, *vae, dev, vae_path)
    if realism:
        result["realism"] = run_realism(real_ds, gen_ds, grid or judge_grid(seg_spacing, seg_size), fit_settings,
                                        vae=vae, device=dev)
    if memorisation:
        result["memorisation"] = run_memorisation(real_ds, gen_ds, *vae, dev,
                                                  heldout_ds=scan(heldout) if heldout is not None else None)
        result["memorisation"]["checkpoint"] = str(vae_path)
    return clean(result)


def _downstream(train, synthetic, test, ratio, seeds, settings, grid, device) -> dict:
    if train is None or test is None:
        raise UserError("--downstream needs --train REAL (labelled) and --test TARGET (labelled); "
                        "--synthetic GEN adds the second arm")
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    return run_downstream(scan(train), scan(test), scan(synthetic) if synthetic is not None else None, ratio=ratio,
                          seeds=tuple(range(seeds)), settings=settings, grid=grid, device=select_device(device))


def _manifest(folder):
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, strict=True))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise DataError(path, f"unreadable manifest ({type(e).__name__})") from None
    if not rows or "id" not in rows[0] or not any(f"requested_{k}" in rows[0] for k in MEASURES):
        raise DataError(path, "not a synth4d manifest (needs id and requested_<measure> columns)")
    for line, row in enumerate(rows, 2):
        for k in MEASURES:
            value = row.get(f"requested_{k}") or ""
            try:
                if value and not np.isfinite(float(value)):
                    raise ValueError
            except ValueError:
                raise DataError(path, f"line {line}: requested_{k} {value[:40]!r} is not a finite number") from None
    return {"path": str(path), "rows": {r["id"]: r for r in rows}}


def _generated_grid(ds) -> GridConfig:
    """The in-plane grid of the generated files (spacing and size of the first subject), keeping every slice."""
    s = ds.refs[0].load()
    return GridConfig(spacing=float(s.spacing[0]), size=int(s.image.shape[0]), slices=MAX_SLICES)


def full_cycle_mask(subject, generated=False):
    """(X, Y, Z, T) labels at every frame, or None: the full-cycle ground truth (phantom), else the
    masks if every frame has one. A generated subject's masks come from one 4D mask file, where a
    frame without labels is simply empty."""
    if subject.full_mask is not None:
        return subject.full_mask
    if generated and subject.masks:
        mask = np.zeros(subject.image.shape, dtype=np.uint8)
        for t, m in subject.masks.items():
            mask[..., t] = m
        return mask
    if len(subject.masks) == subject.n_frames:
        return np.stack([subject.masks[t] for t in range(subject.n_frames)], axis=3)
    return None


# ---- controllability -----------------------------------------------------------------------

def measure_generated(subject) -> dict:
    """Clinical measures of a generated subject's mask: ED = frame 0, ES = the LV volume minimum."""
    mask = full_cycle_mask(subject, generated=True)
    if mask is None:
        raise DataError(subject.path, "generated subject without a 4D mask")
    es = int(np.argmin(volume_curve(mask, subject.spacing)["lv"]))
    m = clinical_measures(mask[..., 0], mask[..., es], subject.spacing)
    return {**m, "max_wall": wall_thickness(mask[..., 0], subject.spacing), "es": es}


def controllability(gen_ds, manifest) -> dict:
    """Per prior: Pearson r, MAE and bias (measured - requested); the rate of diagnosis criteria met."""
    refs = {r.id: r for r in gen_ds.refs}
    requested, measured, checks = {k: [] for k in MEASURES}, {k: [] for k in MEASURES}, {}
    rows = sorted(manifest["rows"].items())
    for sid, row in tqdm(rows, desc="controllability", unit="subject", file=sys.stderr, leave=False):
        if sid not in refs:
            raise DataError(manifest["path"], f"row {sid!r} names no subject in {gen_ds.root}")
        m = measure_generated(refs[sid].load())
        for k in MEASURES:
            if row.get(f"requested_{k}") not in (None, "") and np.isfinite(m[k]):
                requested[k].append(float(row[f"requested_{k}"]))
                measured[k].append(m[k])
        verdict = meets(row.get("dx") or None, m)
        if verdict is not None:
            checks.setdefault(row["dx"], []).append(verdict)
    priors = {k: {"n": len(requested[k]), "r": pearson(requested[k], measured[k]) if len(requested[k]) > 1 else None,
                  "mae": mae(requested[k], measured[k]) if requested[k] else None,
                  "bias": bias(requested[k], measured[k]) if requested[k] else None} for k in MEASURES}
    n_checked = sum(len(v) for v in checks.values())
    return {"subjects": len(manifest["rows"]), "priors": priors,
            "diagnosis": {"rate": sum(sum(v) for v in checks.values()) / n_checked if n_checked else None,
                          "n": n_checked,
                          "per_dx": {dx: {"rate": float(np.mean(v)), "n": len(v)} for dx, v in sorted(checks.items())},
                          "criteria": {dx: CRITERIA[dx] for dx in sorted(checks)},
                          "not_checked": {dx: NOT_CHECKED[dx] for dx in sorted(checks) if dx in NOT_CHECKED}},
            "protocol": "measured on the generated masks (file spacing): ED = frame 0, ES = argmin LV volume; "
                        "bias = measured - requested"}


# ---- temporal coherence ------------------------------------------------------------------

ES_FAR = 0.15   # of the cycle: an ES phase this far from the set's median is counted apart


def es_phase_spread(phases) -> dict:
    """Robust spread of ES phases (fractions of the cycle): the median absolute deviation from the
    median, scaled by 1.4826 to read as an sd for normal data, and how many subjects lie more than
    ES_FAR from the median. A heart that barely contracts has a flat LV curve whose minimum can fall
    anywhere; the sd counts those at full weight, the robust figure does not, and the count says how
    many there are. Distances are taken around the cycle (phase 0.95 is 0.1 from phase 0.05)."""
    p = np.asarray(phases, dtype=float)
    if len(p) < 2:
        return {"es_phase_mad_sd": None, "es_phase_far": None}
    med = float(np.median(p))
    d = np.abs(p - med) % 1.0
    d = np.minimum(d, 1.0 - d)
    return {"es_phase_mad_sd": float(1.4826 * np.median(d)), "es_phase_far": int(np.sum(d > ES_FAR))}


def coherence_stats(ds, grid, generated: bool) -> dict:
    """Volume-curve smoothness, ED/ES timing, frame-to-frame and ED-ES image change and mask topology of one set."""
    lv_smooth, rv_smooth, ed_offset, es_phase, change, change_smooth, frames = [], [], [], [], [], [], []
    excursion = []
    one, present = np.zeros(len(STRUCTURES)), np.zeros(len(STRUCTURES))
    for s in ds.load_each("coherence (generated)" if generated else "coherence (real)"):
        T, ed = s.n_frames, 0 if generated else s.ed
        es = None if generated else s.es
        frames.append(T)
        mask = full_cycle_mask(s, generated)
        if mask is not None:
            curves = volume_curve(mask, s.spacing)
            lv_smooth.append(temporal_smoothness(curves["lv"]))
            rv_smooth.append(temporal_smoothness(curves["rv"]))
            offset = (int(np.argmax(curves["lv"])) - ed) % T
            ed_offset.append(min(offset, T - offset) / T)
            if generated:
                es = int(np.argmin(curves["lv"]))
                es_phase.append(((es - ed) % T) / T)
        if not generated and s.es is not None:
            es_phase.append(((s.es - ed) % T) / T)
        labelled = [mask[..., t] for t in range(T)] if mask is not None else list(s.masks.values())
        for m in labelled:
            for i, label in enumerate(STRUCTURES):
                counts = components_per_slice(m, label)
                one[i] += np.sum(counts == 1)
                present[i] += np.sum(counts > 0)
        p = prepare_subject(s, grid)
        img = p.image[:, :, :p.n_slices]
        step = frame_change(img)                                                        # (T,) t -> t + 1
        change.append(step.mean())
        change_smooth.append(temporal_smoothness(step))
        if es is not None and es != ed:
            excursion.append(ed_es_change(img, ed, es))
    return {"subjects": len(frames), "frames_mean": float(np.mean(frames)), "full_cycle_masks": len(lv_smooth),
            "lv_curve_roughness": _mean(lv_smooth), "rv_curve_roughness": _mean(rv_smooth),
            "ed_offset": _mean(ed_offset), "es_phase": _mean(es_phase),
            "es_phase_sd": float(np.std(es_phase, ddof=1)) if len(es_phase) > 1 else None,
            **es_phase_spread(es_phase),
            "image_change": _mean(change), "image_change_roughness": _mean(change_smooth),
            "ed_es_change": _mean(excursion), "ed_es_subjects": len(excursion),
            "one_component": {LABELS[c]: one[i] / present[i] if present[i] else None
                              for i, c in enumerate(STRUCTURES)},
            "slice_frames": {LABELS[c]: int(present[i]) for i, c in enumerate(STRUCTURES)}}


def ed_es_change(cycle, ed: int, es: int) -> float:
    """Mean |ES frame - ED frame| of a cycle (X, Y, Z, T): how far systole moves the image."""
    return float(np.abs(cycle[..., es] - cycle[..., ed]).mean(dtype=np.float64))


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


# ---- reconstruction ----------------------------------------------------------------------

def reconstruction(real_ds, model, meta, device, path) -> dict:
    """PSNR and SSIM of every frame; Dice and HD95 per structure on labelled frames and on the
    other frames of a full-cycle ground truth (phantom); LVEF and RVEF of the decoded ED and ES masks
    against the true ones; image change per frame and ED-ES change of the decoded and of the real cycles (as
    --coherence measures them: how much motion survives the VAE); all on the VAE's grid."""
    grid = meta["grid"]
    psnrs, ssims = [], []
    per = {kind: {c: {"dice": [], "hd95": []} for c in STRUCTURES} for kind in ("labelled", "unlabelled")}
    efs = {"lvef": ([], []), "rvef": ([], [])}     # (decoded, true) per subject
    changes = {"decoded": [], "real": []}           # per subject, as coherence_stats computes image change
    excursions = {"decoded": [], "real": []}        # per subject, ED-ES change as coherence_stats computes it
    for s in real_ds.load_each("reconstruction"):
        p = prepare_subject(s, grid)
        decoded, images = {}, []
        for t, image, pred, truth, kind in reconstruct_frames(model, p, device):
            images.append(image)
            if t in p.masks:
                decoded[t] = pred
            psnrs.append(psnr(image, p.image[:, :, :p.n_slices, t], data_range=2.0))
            ssims.append(ssim(image, p.image[:, :, :p.n_slices, t], data_range=2.0))
            if kind is None:
                continue
            for c, d in dice(pred, truth, labels=STRUCTURES).items():
                per[kind][c]["dice"].append(d)
                per[kind][c]["hd95"].append(hd95(pred == c, truth == c, p.spacing))
        if len(images) > 1:
            for key, cycle in (("decoded", np.stack(images, axis=3)), ("real", p.image[:, :, :p.n_slices])):
                changes[key].append(frame_change(cycle).mean())
                if p.es is not None and p.es != p.ed:
                    excursions[key].append(ed_es_change(cycle, p.ed, p.es))
        if p.es is not None and {p.ed, p.es} <= set(decoded) and p.ed != p.es:
            n = p.n_slices
            got = clinical_measures(decoded[p.ed], decoded[p.es], p.spacing)
            true = clinical_measures(p.masks[p.ed][:, :, :n], p.masks[p.es][:, :, :n], p.spacing)
            for name, (a, b) in efs.items():
                a.append(got[name])
                b.append(true[name])
    # HD95 is undefined (inf) where one of the two masks lacks the structure: counted, left out of the mean.
    masks = {kind: {LABELS[c]: {"dice": _mean(v["dice"]), "hd95_mm": _mean(v["hd95"]), "frames": len(v["dice"]),
                                "hd95_undefined": int(np.sum(~np.isfinite(v["hd95"])))}
                    for c, v in structures.items()} for kind, structures in per.items() if structures[3]["dice"]}
    ef = {}
    for name, (a, b) in efs.items():
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        ok = np.isfinite(a) & np.isfinite(b)    # a decoded ED mask without the cavity has no EF: counted apart
        ef[name] = {"decoded_mean": _mean(a), "true_mean": _mean(b), "bias": bias(b[ok], a[ok]) if ok.any() else None,
                    "mae": mae(b[ok], a[ok]) if ok.any() else None,      # bias: decoded - true (EF points)
                    "undefined": int(np.sum(~np.isfinite(a)))}
    ef["subjects"] = len(efs["lvef"][0])
    return {"psnr": _mean(psnrs), "ssim": _mean(ssims), "frames": len(psnrs), "masks": masks, "ef": ef,
            "image_change": {k: _mean(v) for k, v in changes.items()},
            "ed_es_change": {k: _mean(v) for k, v in excursions.items()}, "checkpoint": str(path),
            "grid": dataclasses.asdict(grid), "intensity": "images in [-1, 1] (cine.prep), PSNR/SSIM data range 2"}


def image_mask_agreement(gen_ds, model, meta, device, path) -> dict:
    """Do generated images and masks agree? The VAE's mask head segments each generated image on its own
    (as `synth4d segment` does: on the VAE grid, mapped back to the file's grid) and is scored against
    the generated mask: Dice per structure over every frame with a mask."""
    per, subjects = {c: [] for c in STRUCTURES}, 0
    for s in gen_ds.load_each("image-mask agreement"):
        truth = full_cycle_mask(s, generated=True)
        if truth is None:
            continue
        p = prepare_subject(s, meta["grid"])
        _, prob = reconstruct(model, p.image, device)                     # (C, X, Y, Z, T) on the VAE grid
        pred = to_source(prob, p).argmax(axis=0)                          # (X, Y, Z, T) on the file's grid
        subjects += 1
        for t in range(truth.shape[3]):
            if truth[..., t].any():
                for c, d in dice(pred[..., t], truth[..., t], labels=STRUCTURES).items():
                    per[c].append(d)
    return {"dice": {LABELS[c]: _mean(v) for c, v in per.items()}, "frames": len(per[1]), "subjects": subjects,
            "checkpoint": str(path), "protocol": "the VAE's mask head on each generated image vs the generated mask, "
                                                 "Dice per structure, every frame with labels"}
