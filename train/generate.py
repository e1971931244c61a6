"""`synth4d generate`: requests -> priors -> the generation chain -> NIfTI files and a manifest.

Layouts: "flat" writes OUT/synth_NNNN.nii.gz (4D image), OUT/synth_NNNN_mask.nii.gz (4D mask) and
OUT/manifest.csv, a folder+CSV data set the loader reads; "acdc" writes OUT/patientNNN/ exactly as
the phantom does. Each subject's files are written atomically, then its manifest row; a rerun
skips complete subjects, so an interrupted job resumes where it stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import weights as shipped
from cine import DataError, UserError
from cine.measures import clinical_measures, volume_curve
from cine.nifti import Geometry, write
from cine.priors import check_request, draw
from nets.config import UNetConfig
from nets.diffusion import make_schedule
from nets.pipeline import Generator4D
from nets.unet import UNet
from train.common import atomic_write, config_from_dict, load_checkpoint, select_device
from train.ldm import cond_tensors
from train.vae import load_vae

try:
    import fcntl           # POSIX: serialises the manifest updates of jobs writing into one folder
except ImportError:        # elsewhere: one job per output folder
    fcntl = None

CSV_COLUMNS = ("dx", "lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass", "frames")
MAX_ATTEMPTS = 3        # re-draws of a subject that fails the plausibility check
MEASURED = ("lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass")


def load_models(folder, device):
    """Rebuild the chain from vae/static/motion .safetensors in `folder` -> (Generator4D, static meta, motion meta)."""
    folder = Path(folder)
    dev = select_device(device)
    vae, vae_meta = load_vae(folder / "vae.safetensors", dev)
    nets, metas = [], []
    for stage in ("static", "motion"):
        path = folder / f"{stage}.safetensors"
        state, config, meta = load_checkpoint(path, stage=stage)
        net = UNet(config_from_dict(UNetConfig, config))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(path, f"weights do not match their config ({str(e).splitlines()[0][:100]})") from None
        nets.append(net.to(dev, memory_format=torch.channels_last_3d).eval())  # the fast conv3d layout on CPU
        metas.append(meta)
    vae.to(memory_format=torch.channels_last_3d)
    static_meta, motion_meta = metas
    if static_meta["grid"] != dataclasses.asdict(vae_meta["grid"]) or motion_meta["grid"] != static_meta["grid"]:
        raise DataError(folder, "the vae, static and motion checkpoints were trained on different grids")
    f = vae.cfg.factor
    grid = vae_meta["grid"]
    chain = Generator4D(vae, nets[0], nets[1], make_schedule(static_meta["schedule"]), float(static_meta["vae_scale"]),
                        float(motion_meta["residual_scale"]), (grid.size // f, grid.size // f, grid.slices),
                        pred=static_meta["pred"])
    return chain, grid, static_meta, motion_meta


def read_conditions(path) -> list[dict]:
    """--conditions CSV -> one request dict per row (columns: any of CSV_COLUMNS)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        unknown = sorted(set(columns) - set(CSV_COLUMNS))
        if unknown:
            raise DataError(path, f"unknown column(s) {', '.join(unknown)}; allowed: {', '.join(CSV_COLUMNS)}")
        rows = []
        for i, raw in enumerate(reader, start=2):
            row = {}
            for k, v in raw.items():
                k, v = k.strip().lower(), (v or "").strip()
                if not v:
                    continue
                if k == "dx":
                    row[k] = v.upper()
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    raise DataError(path, f"line {i}: {k} {v!r} is not a number") from None
            rows.append(row)
    if not rows:
        raise DataError(path, "no subject rows")
    return rows


def _seed(base, index, attempt=0) -> int:
    return int(np.random.SeedSequence([base & 0xFFFFFFFF, index, attempt]).generate_state(1)[0])


def plausible(labels, spacing, measured) -> str:
    """'' when the ED frame has LV, MYO and RV on contiguous slices and volumes are not absurd, else why not."""
    ed = labels[..., 0]
    for label, name in ((3, "LV"), (2, "MYO"), (1, "RV")):
        slices = np.flatnonzero((ed == label).any(axis=(0, 1)))
        if len(slices) == 0:
            return f"no {name}"
        if slices[-1] - slices[0] + 1 != len(slices):
            return f"{name} not contiguous across slices"
    if not (10 <= measured["lvedv"] <= 600 and 10 <= measured["rvedv"] <= 600 and 20 <= measured["lv_mass"] <= 500):
        return "volumes out of range"
    if not (0 < measured["lvef"] < 95):
        return "LVEF out of range"
    return ""


def _requests(n, dx, given, conditions, frames, slices):
    base = {"dx": dx.upper() if dx else None, **given, "frames": frames, "slices": slices}
    if conditions is None:
        return [dict(base) for _ in range(n)]
    return [{**base, **row} for row in read_conditions(conditions)]


def _names(i, layout):
    if layout == "acdc":
        sid = f"patient{i + 1:03d}"
        return sid, Path(sid) / f"{sid}_4d.nii.gz", Path(sid) / f"{sid}_4d_gt.nii.gz"
    sid = f"synth_{i:04d}"
    return sid, Path(f"{sid}.nii.gz"), Path(f"{sid}_mask.nii.gz")


def generate(out, dx=None, n=1, conditions=None, frames=30, slices=None, steps=25, guidance=2.0, seed=0,
             keyframes=12, weights=None, device="cpu", layout="flat", start=0, overwrite=False, **given):
    """Generate subjects start .. start + n - 1 into `out`; yields one manifest row (dict) per subject."""
    out = Path(out)
    folder = Path(weights) if weights else shipped.DIR
    if not (folder / "static.safetensors").is_file():
        raise UserError(f"no weights in {folder} (vae/static/motion .safetensors); train them or pass --weights")
    chain, grid, smeta, mmeta = load_models(folder, device)
    vocab = list(chain.static.cfg.dx_vocab)
    requests = _requests(n, dx, {k: v for k, v in given.items() if v is not None}, conditions, frames, slices)
    for req in requests:  # every request is checked before any work
        check_request(req, vocab)
        if req.get("slices") is not None and not 1 <= req["slices"] <= grid.slices:
            raise UserError(f"slices must be between 1 and {grid.slices} for these weights, got {req['slices']:g}")
        if not 2 <= int(req.get("frames") or frames) <= 200:
            raise UserError(f"frames must be between 2 and 200, got {req.get('frames')}")

    manifest = _read_manifest(out / "manifest.csv")
    pending = []
    for k, req in enumerate(requests):
        i = start + k
        sid, image_rel, mask_rel = _names(i, layout)
        done = manifest.get(sid)
        if done and not overwrite:
            if int(done["seed"]) != _seed(seed, i, int(done["attempts"]) - 1):
                raise UserError(f"{out / image_rel} was generated with another seed; pass --overwrite or another OUT")
            files = [out / p for p in done["files"].split(";")]
            if all(p.exists() for p in files):
                yield {**done, "files": [str(p) for p in files], "skipped": True}
                continue
        if not overwrite and (out / image_rel).exists():
            raise UserError(f"{out / image_rel} exists and is not in {out / 'manifest.csv'}; pass --overwrite")
        pending.append((i, req))

    bar = tqdm(pending, desc="generating", unit="subject", file=sys.stderr, disable=not pending)
    for i, req in bar:
        row = _one(chain, grid, smeta, mmeta, vocab, out, layout, i, req, seed, steps, guidance, keyframes)
        _write_manifest(out / "manifest.csv", {row["id"]: row})
        yield {**row, "files": [str(out / p) for p in row["files"].split(";")]}


def _one(chain, grid, smeta, mmeta, vocab, out, layout, i, req, seed, steps, guidance, keyframes):
    """Generate, check and write subject i (re-drawn up to MAX_ATTEMPTS times) -> its manifest row."""
    dev = chain.device
    T = int(req.get("frames") or 30)
    for attempt in range(MAX_ATTEMPTS):
        s = _seed(seed, i, attempt)
        values = draw(smeta["priors"], req, np.random.default_rng(s))
        scond = cond_tensors([values], list(smeta["norm"]), smeta["norm"], vocab)
        mcond = cond_tensors([values], list(mmeta["norm"]), mmeta["norm"], vocab)
        image, labels = chain.generate({k: v.to(dev) for k, v in scond.items()}, {k: v.to(dev) for k, v in mcond.items()},
                                       values["slices"], [t / T for t in range(T)], s, steps, guidance, keyframes)
        image, labels = image[..., :values["slices"], :].numpy(), labels[..., :values["slices"], :].numpy()
        spacing = (grid.spacing, grid.spacing, values["slice_mm"])
        lv = volume_curve(labels, spacing)["lv"]
        es = int(np.argmin(lv))
        measured = clinical_measures(labels[..., 0], labels[..., es], spacing)
        why = plausible(labels, spacing, measured)
        if not why:
            break
    geom = Geometry.from_spacing(spacing, frame_ms=values["rr_ms"] / T)
    sid, image_rel, mask_rel = _names(i, layout)
    files = _write_subject(out, layout, sid, image_rel, mask_rel, image, labels, geom, values["dx"], es)
    row = {"id": sid, "seed": s, "attempts": attempt + 1, "plausible": why or "yes", "dx": values["dx"] or "",
           "ed": 0, "es": es, "frames": T, "slices": values["slices"], "slice_mm": round(values["slice_mm"], 3),
           "steps": steps, "guidance": guidance, "keyframes": keyframes}
    for k in MEASURED:
        row[f"requested_{k}"] = round(values[k], 3)
        row[f"given_{k}"] = int(req.get(k) is not None)
        row[f"measured_{k}"] = round(float(measured[k]), 3) if math.isfinite(measured[k]) else ""
    row["files"] = ";".join(str(p) for p in files)
    return row


def _write_subject(out, layout, sid, image_rel, mask_rel, image, labels, geom, dx, es):
    """Image as int16 in 0..1000 (the [-1, 1] model range), masks uint8; returns the paths relative to out."""
    image = np.round((image + 1) * 500).astype(np.int16)
    write(out / image_rel, image, geom)
    write(out / mask_rel, labels, geom, kind="mask")
    files = [image_rel, mask_rel]
    if layout == "acdc":
        frame_geom = Geometry(geom.affine, geom.spacing, None)
        for t in (0, es):
            for suffix, data, kind in (("", image[..., t], "image"), ("_gt", labels[..., t], "mask")):
                rel = Path(sid) / f"{sid}_frame{t + 1:02d}{suffix}.nii.gz"
                write(out / rel, data, frame_geom, kind=kind)
                files.append(rel)
        info = f"ED: 1\nES: {es + 1}\nGroup: {dx or ''}\nNbFrame: {image.shape[3]}\n"
        tmp = out / sid / f".tmp{os.getpid()}_Info.cfg"
        tmp.write_text(info)
        os.replace(tmp, out / sid / "Info.cfg")
        files.append(Path(sid) / "Info.cfg")
    return files


def _read_manifest(path) -> dict:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _write_manifest(path, rows: dict):
    """Add or replace `rows` in the manifest at `path`, under a lock: jobs generating into one folder
    (e.g. --start 0 and --start 50 side by side) keep each other's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".manifest.lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {**_read_manifest(path), **rows}
        buf = io.StringIO()
        columns = list(dict.fromkeys(c for row in rows.values() for c in row))
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for sid in sorted(rows):
            writer.writerow(rows[sid])
        atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
