"""`synth4d eval`: a generated data set against a real one — FVD (or fvd_vae), controllability,
temporal coherence — and the VAE's reconstruction of the real set.

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
import torch
import torch.nn.functional as F
from tqdm import tqdm

import weights as shipped
from cine import LABELS, DataError, UserError
from cine.datasets import scan
from cine.diagnosis import CRITERIA, NOT_CHECKED, meets
from cine.measures import clinical_measures, volume_curve, wall_thickness
from cine.metrics import (bias, components_per_slice, dice, frechet_distance, gaussian_stats, hd95, mae, pearson,
                          psnr, ssim, temporal_smoothness)
from cine.prep import prepare_subject, to_source
from nets.config import GridConfig
from nets.i3d import SIZE as I3D_SIZE
from train.common import autocast, select_device

FVD_FRAMES = 16
POOL = 4              # fvd_vae: posterior means averaged to POOL x POOL in-plane
MAX_SLICES = 32       # more than any short-axis stack: FVD and coherence see every slice
PRIORS = ("lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass")
STRUCTURES = (1, 2, 3)
COHERENCE = ("roughness: mean |second difference| / range of a periodic curve, lower is smoother, higher with "
             "fewer frames (compare sets with equal frame counts); image change: mean |frame t+1 - frame t| "
             "on the common grid, intensities in [-1, 1]; ED offset: distance of the LV maximum from the ED "
             "frame, ES phase: ES after ED (generated: LV minimum; real: metadata), as fractions of the cycle; "
             "one component: fraction of slices x frames holding a structure where it is one 4-connected piece "
             "(real: full-cycle masks, else the labelled frames)")


def evaluate(real, generated=None, fvd=False, control=False, coherence=False, recon=False, agreement=False,
             i3d=None, weights=None, device="cpu") -> dict:
    """Every requested metric (none requested: all that apply) as a JSON-serialisable dict."""
    if real is None:
        raise UserError("eval needs REAL, a data set to compare against (GENERATED is optional)")
    real_ds = scan(real)
    gen_ds = scan(generated) if generated is not None else None
    manifest = _manifest(generated) if generated is not None else None
    vae_path = Path(weights or shipped.DIR) / "vae.safetensors"
    if not (fvd or control or coherence or recon or agreement):
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
    if recon or agreement or (fvd and i3d is None):
        from train.vae import load_vae
        vae = load_vae(vae_path, dev)
    result = {"real": {"path": str(real), "layout": real_ds.layout, "subjects": len(real_ds.refs)}}
    if gen_ds is not None:
        result["generated"] = {"path": str(generated), "layout": gen_ds.layout, "subjects": len(gen_ds.refs),
                               "manifest": manifest is not None}
    grid = _generated_grid(gen_ds) if gen_ds is not None else None
    if fvd and i3d is not None:
        from nets.i3d import load_i3d
        result["fvd"] = fvd_report(real_ds, gen_ds, grid, i3d_features=load_i3d(i3d, dev), i3d_path=i3d)
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
    return _clean(result)


def _manifest(folder):
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0] or not any(f"requested_{k}" in rows[0] for k in PRIORS):
        raise DataError(path, "not a synth4d manifest (needs id and requested_<measure> columns)")
    return {"path": str(path), "rows": {r["id"]: r for r in rows}}


def _generated_grid(ds) -> GridConfig:
    """The in-plane grid of the generated files (spacing and size of the first subject), keeping every slice."""
    s = ds.refs[0].load()
    return GridConfig(spacing=float(s.spacing[0]), size=int(s.image.shape[0]), slices=MAX_SLICES)


def _subjects(ds, desc):
    for ref in tqdm(ds.refs, desc=desc, unit="subject", file=sys.stderr, leave=False):
        yield ref.load()


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


# ---- FVD ---------------------------------------------------------------------------------

def cycle_frames(image, ed, n=FVD_FRAMES):
    """(X, Y, Z, T) -> (X, Y, Z, n): the cycle from ED, linearly interpolated at n even phases (periodic)."""
    image = np.roll(image, -ed, axis=3)
    pos = np.arange(n) * image.shape[3] / n
    i0 = np.floor(pos).astype(int)
    w = (pos - i0).astype(np.float32)
    return image[..., i0] * (1 - w) + image[..., (i0 + 1) % image.shape[3]] * w


def _cycles(ds, grid, desc):
    """Per subject: its cycle from ED on grid at 16 phases (X, Y, Z, 16) and its number of real slices."""
    for s in _subjects(ds, desc):
        p = prepare_subject(s, grid)
        yield cycle_frames(p.image, p.ed), p.n_slices


@torch.no_grad()
def vae_clip_features(frames, n_slices, vae, device):
    """fvd_vae feature of each slice clip: posterior means (x latent scale) of the 16 frames, averaged to
    POOL x POOL in-plane per latent channel, then their mean and std over the 16 frames: (n, 2 C POOL^2)."""
    model, meta = vae
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(frames, 3, 0)))[:, None].to(device)  # (16, 1, X, Y, Z)
    with autocast(device):
        mean = model.encode(x).mode().float() * float(meta["scale"])                         # (16, C, x, y, Z)
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
    requested, measured, checks = {k: [] for k in PRIORS}, {k: [] for k in PRIORS}, {}
    rows = sorted(manifest["rows"].items())
    for sid, row in tqdm(rows, desc="controllability", unit="subject", file=sys.stderr, leave=False):
        if sid not in refs:
            raise DataError(manifest["path"], f"row {sid!r} names no subject in {gen_ds.root}")
        m = measure_generated(refs[sid].load())
        for k in PRIORS:
            if row.get(f"requested_{k}") not in (None, "") and np.isfinite(m[k]):
                requested[k].append(float(row[f"requested_{k}"]))
                measured[k].append(m[k])
        verdict = meets(row.get("dx") or None, m)
        if verdict is not None:
            checks.setdefault(row["dx"], []).append(verdict)
    priors = {k: {"n": len(requested[k]), "r": pearson(requested[k], measured[k]) if len(requested[k]) > 1 else None,
                  "mae": mae(requested[k], measured[k]) if requested[k] else None,
                  "bias": bias(requested[k], measured[k]) if requested[k] else None} for k in PRIORS}
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

def coherence_stats(ds, grid, generated: bool) -> dict:
    """Volume-curve smoothness, ED/ES timing, frame-to-frame image change and mask topology of one set."""
    lv_smooth, rv_smooth, ed_offset, es_phase, change, change_smooth, frames = [], [], [], [], [], [], []
    one, present = np.zeros(len(STRUCTURES)), np.zeros(len(STRUCTURES))
    for s in _subjects(ds, "coherence (generated)" if generated else "coherence (real)"):
        T, ed = s.n_frames, 0 if generated else s.ed
        frames.append(T)
        mask = full_cycle_mask(s, generated)
        if mask is not None:
            curves = volume_curve(mask, s.spacing)
            lv_smooth.append(temporal_smoothness(curves["lv"]))
            rv_smooth.append(temporal_smoothness(curves["rv"]))
            offset = (int(np.argmax(curves["lv"])) - ed) % T
            ed_offset.append(min(offset, T - offset) / T)
            if generated:
                es_phase.append(((int(np.argmin(curves["lv"])) - ed) % T) / T)
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
        step = np.abs(np.roll(img, -1, axis=3) - img).mean(axis=(0, 1, 2), dtype=np.float64)  # (T,) t -> t + 1
        change.append(step.mean())
        change_smooth.append(temporal_smoothness(step))
    return {"subjects": len(frames), "frames_mean": float(np.mean(frames)), "full_cycle_masks": len(lv_smooth),
            "lv_curve_roughness": _mean(lv_smooth), "rv_curve_roughness": _mean(rv_smooth),
            "ed_offset": _mean(ed_offset), "es_phase": _mean(es_phase),
            "es_phase_sd": float(np.std(es_phase, ddof=1)) if len(es_phase) > 1 else None,
            "image_change": _mean(change), "image_change_roughness": _mean(change_smooth),
            "one_component": {LABELS[c]: one[i] / present[i] if present[i] else None
                              for i, c in enumerate(STRUCTURES)},
            "slice_frames": {LABELS[c]: int(present[i]) for i, c in enumerate(STRUCTURES)}}


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


# ---- reconstruction ----------------------------------------------------------------------

def reconstruction(real_ds, model, meta, device, path) -> dict:
    """PSNR and SSIM of every frame; Dice and HD95 per structure on labelled frames and on the
    other frames of a full-cycle ground truth (phantom), all on the VAE's grid."""
    from train.vae import reconstruct

    grid = meta["grid"]
    psnrs, ssims = [], []
    per = {kind: {c: {"dice": [], "hd95": []} for c in STRUCTURES} for kind in ("labelled", "unlabelled")}
    for s in _subjects(real_ds, "reconstruction"):
        p = prepare_subject(s, grid)
        n = p.n_slices
        image, prob = reconstruct(model, p.image, device)
        pred = prob.argmax(axis=0).astype(np.uint8)                       # (X, Y, Z, T)
        for t in range(p.image.shape[3]):
            psnrs.append(psnr(image[:, :, :n, t], p.image[:, :, :n, t], data_range=2.0))
            ssims.append(ssim(image[:, :, :n, t], p.image[:, :, :n, t], data_range=2.0))
            if t in p.masks:
                truth, kind = p.masks[t], "labelled"
            elif p.full_mask is not None:
                truth, kind = p.full_mask[..., t], "unlabelled"
            else:
                continue
            for c, d in dice(pred[:, :, :n, t], truth[:, :, :n], labels=STRUCTURES).items():
                per[kind][c]["dice"].append(d)
                per[kind][c]["hd95"].append(hd95(pred[:, :, :n, t] == c, truth[:, :, :n] == c, p.spacing))
    # HD95 is undefined (inf) where one of the two masks lacks the structure: counted, left out of the mean.
    masks = {kind: {LABELS[c]: {"dice": _mean(v["dice"]), "hd95_mm": _mean(v["hd95"]), "frames": len(v["dice"]),
                                "hd95_undefined": int(np.sum(~np.isfinite(v["hd95"])))}
                    for c, v in structures.items()} for kind, structures in per.items() if structures[3]["dice"]}
    return {"psnr": _mean(psnrs), "ssim": _mean(ssims), "frames": len(psnrs), "masks": masks, "checkpoint": str(path),
            "grid": dataclasses.asdict(grid), "intensity": "images in [-1, 1] (cine.prep), PSNR/SSIM data range 2"}


def image_mask_agreement(gen_ds, model, meta, device, path) -> dict:
    """Do generated images and masks agree? The VAE's mask head segments each generated image on its own
    (as `synth4d segment` does: on the VAE grid, mapped back to the file's grid) and is scored against
    the generated mask: Dice per structure over every frame with a mask."""
    from train.vae import reconstruct

    per, subjects = {c: [] for c in STRUCTURES}, 0
    for s in _subjects(gen_ds, "image-mask agreement"):
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


# ---- output ------------------------------------------------------------------------------

def _clean(obj):
    """JSON-safe: numpy scalars to Python, NaN and infinities to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _f(x, fmt=".3g"):
    return "-" if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    """A readable report of evaluate's result, for stderr."""
    lines = [f"real       {result['real']['path']} ({result['real']['layout']}, {result['real']['subjects']} subjects)"]
    if "generated" in result:
        g = result["generated"]
        lines.append(f"generated  {g['path']} ({g['layout']}, {g['subjects']} subjects)")
    for name in ("fvd", "fvd_vae"):
        if name in result:
            r, p = result[name], result[name]["protocol"]
            lines += ["", f"{name.upper() if name == 'fvd' else name}  {_f(r['value'], '.4g')}   "
                          f"(real half vs half: {_f(r['real_halves'], '.4g')})",
                      f"  feature: {p['feature']}",
                      f"  clips: {p['clip']}; resolution {p['resolution'][0]} x {p['resolution'][1]}",
                      f"  subjects real {p['subjects']['real']} / generated {p['subjects']['generated']}, "
                      f"clips real {p['clips']['real']} / generated {p['clips']['generated']}, "
                      f"halves {p['real_halves']['clips']}"]
    if "control" in result:
        c = result["control"]
        lines += ["", f"controllability ({c['subjects']} subjects; {c['protocol']})",
                  f"  {'prior':<8}{'n':>5}{'r':>8}{'MAE':>9}{'bias':>9}"]
        lines += [f"  {k:<8}{v['n']:>5}{_f(v['r'], '.3f'):>8}{_f(v['mae'], '.2f'):>9}{_f(v['bias'], '+.2f'):>9}"
                  for k, v in c["priors"].items()]
        d = c["diagnosis"]
        lines.append(f"  diagnosis criteria met: {_f(d['rate'], '.2f')} of {d['n']}  "
                     + "  ".join(f"{dx} {v['rate']:.2f} ({v['n']})" for dx, v in d["per_dx"].items()))
        lines += [f"    {dx}: {text}" for dx, text in d["criteria"].items()]
        lines += [f"    not checked, {dx}: {text}" for dx, text in d["not_checked"].items()]
    if "coherence" in result:
        r, g = result["coherence"]["real"], result["coherence"]["generated"]
        keys = [("subjects", "subjects"), ("frames (mean)", "frames_mean"), ("full-cycle masks", "full_cycle_masks"),
                ("LV curve roughness", "lv_curve_roughness"), ("RV curve roughness", "rv_curve_roughness"),
                ("ED offset (cycle)", "ed_offset"), ("ES phase (cycle)", "es_phase"), ("ES phase sd", "es_phase_sd"),
                ("image change / frame", "image_change"), ("image change roughness", "image_change_roughness")]
        rows = [(label, r[k], g[k]) for label, k in keys]
        rows += [(f"one component {s}", r["one_component"][s], g["one_component"][s]) for s in r["one_component"]]
        lines += ["", f"{'temporal coherence':<24}{'real':>10}{'generated':>12}"]
        lines += [f"  {label:<22}{_f(a):>10}{_f(b):>12}" for label, a, b in rows]
    if "recon" in result:
        r = result["recon"]
        lines += ["", f"reconstruction ({r['checkpoint']}, {r['frames']} frames): "
                      f"PSNR {_f(r['psnr'], '.2f')} dB, SSIM {_f(r['ssim'], '.3f')}"]
        lines += [f"  {kind:<10} {s:<4} Dice {_f(v['dice'], '.3f')}  HD95 {_f(v['hd95_mm'], '.2f')} mm  "
                  f"({v['frames']} frames)"
                  for kind, per in r["masks"].items() for s, v in per.items()]
    if "agreement" in result:
        a = result["agreement"]
        lines += ["", f"image-mask agreement ({a['subjects']} subjects, {a['frames']} frames; the VAE's mask head on "
                      "generated images vs generated masks): "
                      + ", ".join(f"Dice {k} {_f(v, '.3f')}" for k, v in a["dice"].items())]
    return "\n".join(lines)
