"""`synth4d generate`: requests -> subjects (jobs.synthesize) -> NIfTI files and a manifest.

Layouts: "flat" writes OUT/synth_NNNN.nii.gz (4D image), OUT/synth_NNNN_mask.nii.gz (4D mask) and
OUT/manifest.csv, a folder+CSV data set the loader reads; "acdc" writes OUT/patientNNN/ exactly as
the phantom does (each folder whole or not at all). Each subject's files are written atomically, then
its manifest row; a rerun skips complete subjects, so an interrupted job resumes where it stopped.
While a subject is being written, OUT/.pending/<id> names the process writing it: a rerun redoes a
subject whose writer was killed or failed, even when some of its files are already there.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth4d.cine import FILE_MODE, DataError, UserError, atomic_folder, atomic_write, pid_running
from synth4d.cine.grid import OutputGrid
from synth4d.cine.grid import explicit as grid_explicit
from synth4d.cine.grid import like as grid_like
from synth4d.cine.measures import MEASURES
from synth4d.cine.nifti import Geometry, write
from synth4d.jobs.synthesize import Sampling, Synthetic, load, manifest_row, subject_seed
from synth4d.weights.checkpoint import weights_identity

try:
    import fcntl           # POSIX: serialises the manifest updates of jobs writing into one folder
except ImportError:        # elsewhere: one job per output folder
    fcntl = None

CSV_COLUMNS = ("dx", *MEASURES, "es_phase", "frames")
PENDING = ".pending"     # OUT/.pending/<id>: the pid of the process writing subject id, or FAILED
FAILED = "failed"


def read_conditions(path) -> list[tuple[int, dict]]:
    """--conditions CSV -> (line number, request) per row. Columns: any of CSV_COLUMNS; numbers finite,
    frames whole. A malformed file or row is a DataError naming the file and the line."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            columns = [c.strip().lower() for c in next(reader, [])]
            unknown = sorted(set(columns) - set(CSV_COLUMNS))
            if unknown:
                raise DataError(path, f"unknown column(s) {', '.join(unknown)}; allowed: {', '.join(CSV_COLUMNS)} "
                                      "(comma-separated)")
            if len(set(columns)) != len(columns):
                raise DataError(path, "a column appears twice in the header")
            rows = [(reader.line_num, _condition_row(path, reader.line_num, columns, values))
                    for values in reader if any(v.strip() for v in values)]
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text (save the CSV as UTF-8)") from None
    except csv.Error as e:
        raise DataError(path, f"line {reader.line_num}: not a well-formed CSV row ({e})") from None
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror})") from None
    if not rows:
        raise DataError(path, "no subject rows")
    return rows


def _condition_row(path, line, columns, values) -> dict:
    if len(values) > len(columns):
        raise DataError(path, f"line {line}: {len(values)} fields for {len(columns)} columns")
    row = {}
    for k, v in zip(columns, values):
        v = v.strip()
        if not v:
            continue
        if k == "dx":
            row[k] = v.upper()
            continue
        try:
            row[k] = float(v)
        except ValueError:
            raise DataError(path, f"line {line}: {k} {v[:40]!r} is not a number") from None
        if not math.isfinite(row[k]) or (k == "frames" and row[k] != round(row[k])):
            raise DataError(path, f"line {line}: {k} {v[:40]!r} is not a {'whole' if k == 'frames' else 'finite'} number")
    return row


def _requests(n, dx, given, conditions, frames, slices) -> list[tuple[int | None, dict]]:
    """(CSV line or None, request) per subject."""
    base = {"dx": dx.upper() if dx else None, **given, "frames": frames, "slices": slices}
    if conditions is None:
        return [(None, dict(base)) for _ in range(n)]
    return [(line, {**base, **row}) for line, row in read_conditions(conditions)]


PREFIX = {"flat": "synth_", "acdc": "patient"}
LABEL_ORDERS = {"acdc": np.array([0, 1, 2, 3], np.uint8),   # 1 RV, 2 MYO, 3 LV (inside the tool)
                "mnms": np.array([0, 3, 2, 1], np.uint8)}   # 1 LV, 2 MYO, 3 RV (M&Ms, M&Ms-2)
LABEL_NAMES = {"acdc": {"0": "background", "1": "RV", "2": "MYO", "3": "LV"},
               "mnms": {"0": "background", "1": "LV", "2": "MYO", "3": "RV"}}


def check_prefix(prefix: str) -> str:
    """A subject-name prefix: a letter, then letters, digits, '_' or '-' (at most 40): safe in any file name."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,39}", prefix or ""):
        raise UserError(f"--prefix {prefix[:50]!r}: use a letter, then letters, digits, '_' or '-' (at most 40)")
    return prefix


def _names(i, layout, prefix=None):
    """(id, image path, mask path, sidecar path), relative to OUT, of subject i."""
    prefix = prefix or PREFIX[layout]
    if layout == "acdc":
        sid = f"{prefix}{i + 1:03d}"
        return sid, Path(sid) / f"{sid}_4d.nii.gz", Path(sid) / f"{sid}_4d_gt.nii.gz", Path(sid) / f"{sid}.json"
    sid = f"{prefix}{i:04d}"
    return sid, Path(f"{sid}.nii.gz"), Path(f"{sid}_mask.nii.gz"), Path(f"{sid}.json")


def generate(out, dx=None, n=1, conditions=None, frames=30, slices=None, sampler=None, steps=None,
             guidance=None, seed=0, keyframes=12, weights=None, device="auto", layout="flat", start=0, overwrite=False,
             prefix=None, labels="acdc", preview=False, like=None, size=None, spacing=None, shard=None,
             motion_sampler=None, motion_steps=None, motion_guidance=None, guided_fraction=None,
             motion_guided_fraction=None, motion_final_t=None, **given):
    """Generate subjects start .. start + n - 1 into `out` (only shard K of N of them with shard="K/N");
    yields one manifest row (dict) per subject."""
    out = Path(out)
    if prefix is not None:
        check_prefix(prefix)
    if labels not in LABEL_ORDERS:
        raise UserError(f"--labels {labels!r}: expected acdc or mnms")
    output = grid_like(like, size, spacing) if like is not None else grid_explicit(size, spacing)
    model = load(weights, device)
    requests = []
    for line, req in _requests(n, dx, {k: v for k, v in given.items() if v is not None}, conditions, frames, slices):
        try:  # every request is checked before any work
            model.check(req)
        except UserError as e:
            if line is None:
                raise
            raise DataError(conditions, f"line {line}: {e}") from None
        requests.append(req)
    sampling = Sampling(sampler, steps, guidance, keyframes, motion_sampler, motion_steps, motion_guidance,
                        guided_fraction, motion_guided_fraction, motion_final_t)
    _check_output(out)
    identity = weights_identity(weights)

    manifest = _read_manifest(out / "manifest.csv")
    pending = []
    first, last = shard_range(shard, len(requests))
    for k, req in enumerate(requests):
        if not first <= k < last:
            continue
        i = start + k
        sid, image_rel, _, _ = _names(i, layout, prefix)
        done = manifest.get(sid)
        request = _request_id(req, sampling, identity, seed, i, labels, output)
        if done and not overwrite:
            # Manifests written before the request column existed are compared by seed alone.
            if (done.get("request", request) != request
                    or int(done["seed"]) != subject_seed(seed, i, int(done["attempts"]) - 1)):
                raise UserError(f"{out / image_rel} was generated from another request (conditions, frames, sampler, "
                                f"steps, guidance, keyframes, weights or seed); pass --overwrite or another OUT")
            files = [out / p for p in done["files"].split(";")]
            if all(p.exists() for p in files):
                yield {**_typed(done), "files": [str(p) for p in files], "skipped": True}
                continue
        if not overwrite and (out / image_rel).exists() and not _interrupted(out, sid):
            raise UserError(f"{out / image_rel} exists and is not in {out / 'manifest.csv'}; pass --overwrite")
        pending.append((i, req, request))

    for i, req, request in tqdm(pending, desc="generating", unit="subject", file=sys.stderr, disable=not pending):
        subject = model.subject(req, i, seed, sampling, output)
        sid = _names(i, layout, prefix)[0]
        marker = atomic_write(out / PENDING / sid, lambda tmp: Path(tmp).write_text(str(os.getpid())))
        try:
            row = {**manifest_row(sid, subject, req, sampling), "labels": labels, "weights": identity,
                   "request": request}
            files = _write(out, layout, i, subject, prefix, labels, row)
            if preview:
                files.append(_preview(out, files[0], subject))
            row["files"] = ";".join(map(str, files))
            _write_manifest(out / "manifest.csv", {sid: row})
        except BaseException:  # an error or an interrupt here: a rerun redoes this subject
            marker.write_text(FAILED)
            raise
        marker.unlink()
        yield {**row, "files": [str(out / p) for p in row["files"].split(";")]}


def shard_range(shard, n: int) -> tuple:
    """[first, last) of the n subjects that shard "K/N" generates: the K-th of N contiguous, near-equal
    blocks (the same indices, seeds and files a single run gives them). None: all; under torchrun
    (RANK and WORLD_SIZE set, WORLD_SIZE > 1) each rank takes its own block."""
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return 0, n
        shard = f"{int(os.environ.get('RANK', '0')) + 1}/{world}"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UserError(f"--shard {str(shard)[:20]!r}: expected K/N with 1 <= K <= N, e.g. 2/8")
    k, parts = int(m.group(1)), int(m.group(2))
    if parts > n:
        raise UserError(f"--shard {k}/{parts}: {parts} shards for {n} subjects would leave some empty; use at most {n}")
    return (k - 1) * n // parts, k * n // parts


def _request_id(req, sampling, identity, seed, index, labels="acdc", output: OutputGrid = OutputGrid()) -> str:
    """A digest of everything that makes subject `index`: the request, the sampling, the weights, the seed
    (and the label order and output grid, when not the defaults)."""
    how = dataclasses.asdict(sampling)
    if how["guided_fraction"] == how["motion_guided_fraction"] == 1.0:   # as before guided fractions existed
        del how["guided_fraction"], how["motion_guided_fraction"]
    if how["motion_final_t"] is None:   # the trailing grid, as before the grid's end could be chosen
        del how["motion_final_t"]
    if sampling.shared():   # both models alike: the digest manifests had before the motion model's own settings
        del how["motion_sampler"], how["motion_steps"], how["motion_guidance"]
    parts = [req, how, identity, seed, index] + ([labels] if labels != "acdc" else [])
    parts += [output.describe()] if output != OutputGrid() else []
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _interrupted(out, sid) -> bool:
    """Whether subject sid was being written by a process that failed or no longer runs."""
    try:
        text = (out / PENDING / sid).read_text()
    except OSError:
        return False
    return text == FAILED or (text.isdigit() and not pid_running(int(text)))


def sidecar(row: dict, subject: Synthetic, labels: str) -> dict:
    """The JSON written beside a subject's files: what it is, how it was made, and its label convention."""
    from synth4d import __version__
    measures = {w: {k: row[f"{w}_{k}"] for k in MEASURES} for w in ("requested", "measured")}
    return {"synthetic": True, "generator": f"synth4d {__version__}", "id": row["id"], "dx": row["dx"] or None,
            **measures, "given": [k for k in MEASURES if row[f"given_{k}"]],
            "seed": row["seed"], "attempts": row["attempts"], "plausible": row["plausible"],
            "sampling": {k: None if row[k] == "" else row[k]
                         for k in ("sampler", "steps", "guidance", "motion_sampler", "motion_steps", "motion_guidance",
                                   "guided_fraction", "motion_guided_fraction", "motion_final_t", "keyframes",
                                   "precision")},
            "weights": row["weights"], "request": row["request"],
            "frames": row["frames"], "ed": row["ed"], "es": row["es"],
            "spacing_mm": list(subject.geometry.spacing), "frame_ms": subject.geometry.frame_ms,
            "labels": {"convention": labels, **LABEL_NAMES[labels]}}


def _write(out, layout, i, subject: Synthetic, prefix, labels, row) -> list:
    """The subject's files, written atomically: image as int16 in 0..1000 (the [-1, 1] model range), masks
    uint8 in the `labels` order, both marked synthetic in the header, and the JSON sidecar; with the acdc
    layout the subject's folder, whole, with the ED and ES frames and Info.cfg too. Returns the paths
    relative to out."""
    from synth4d import __version__
    sid, image_rel, mask_rel, side_rel = _names(i, layout, prefix)
    image, geom, es = np.round((subject.image + 1) * 500).astype(np.int16), subject.geometry, subject.es
    mask = LABEL_ORDERS[labels][subject.mask]
    descrip = f"synth4d {__version__} synthetic"
    side = json.dumps(sidecar(row, subject, labels), indent=1) + "\n"
    if layout == "flat":
        write(out / image_rel, image, geom, descrip=descrip)
        write(out / mask_rel, mask, geom, kind="mask", descrip=f"{descrip} labels {labels}")
        atomic_write(out / side_rel, lambda tmp: Path(tmp).write_text(side))
        return [image_rel, mask_rel, side_rel]
    frame_geom = Geometry(geom.affine, geom.spacing, None)
    names = [image_rel.name, mask_rel.name] + [f"{sid}_frame{t + 1:02d}{suffix}.nii.gz" for t in (0, es)
                                               for suffix in ("", "_gt")] + ["Info.cfg", side_rel.name]

    def write_folder(tmp):
        write(tmp / image_rel.name, image, geom, descrip=descrip)
        write(tmp / mask_rel.name, mask, geom, kind="mask", descrip=f"{descrip} labels {labels}")
        for t in (0, es):
            write(tmp / f"{sid}_frame{t + 1:02d}.nii.gz", image[..., t], frame_geom, descrip=descrip)
            write(tmp / f"{sid}_frame{t + 1:02d}_gt.nii.gz", mask[..., t], frame_geom, kind="mask",
                  descrip=f"{descrip} labels {labels}")
        (tmp / "Info.cfg").write_text(f"ED: 1\nES: {es + 1}\nGroup: {subject.values['dx'] or ''}\n"
                                      f"NbFrame: {image.shape[3]}\n" + (f"Labels: {labels}\n" if labels != "acdc" else ""))
        (tmp / side_rel.name).write_text(side)

    atomic_folder(out / sid, write_folder)
    return [Path(sid) / name for name in names]


def _preview(out, image_rel: Path, subject: Synthetic) -> Path:
    """The subject's PNG mosaic (jobs.preview) beside its image; returns its path relative to out."""
    from synth4d.jobs.preview import render
    name = image_rel.name[:-len(".nii.gz")].removesuffix("_4d") + ".png"
    render(subject.image, subject.mask, 0, subject.es, subject.geometry.frame_ms, out / image_rel.parent / name)
    return image_rel.parent / name


INT_COLUMNS = {"seed", "attempts", "ed", "es", "frames", "slices", "steps", "motion_steps", "motion_final_t", "keyframes", *(f"given_{k}" for k in MEASURES)}
FLOAT_COLUMNS = {"slice_mm", "es_phase", "guidance", "motion_guidance", "guided_fraction", "motion_guided_fraction", *(f"{w}_{k}" for w in ("requested", "measured") for k in MEASURES)}


def _typed(row: dict) -> dict:
    """A manifest row as read back (strings) with the types a new row has, so --json rows look alike."""
    def value(k, v):
        if v == "" or (k not in INT_COLUMNS and k not in FLOAT_COLUMNS):
            return v
        return int(v) if k in INT_COLUMNS else float(v)
    return {k: value(k, v) for k, v in row.items()}


def _check_output(out: Path) -> None:
    """The output folder can be made and written to, before any work (a probe file, removed again)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another OUT")
    try:
        atomic_write(out / PENDING / f".probe{os.getpid()}", lambda tmp: Path(tmp).write_text("")).unlink()
    except OSError as e:
        raise DataError(out, f"cannot write the output folder ({e.strerror or e})") from None


MANIFEST_NEEDS = ("id", "seed", "attempts", "files")


def _read_manifest(path) -> dict:
    """id -> row of the manifest at `path` ({} if there is none); DataError if it is not one generate wrote."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, strict=True)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise DataError(path, f"unreadable manifest ({type(e).__name__}); move it away or pass another OUT") from None
    missing = [c for c in MANIFEST_NEEDS if c not in (reader.fieldnames or [])]
    bad = next((i for i, r in enumerate(rows, 2) if None in r or not (r.get("seed") or "").isdigit()
                or not (r.get("attempts") or "").isdigit()), None)
    if missing or bad is not None:
        why = f"no {', '.join(missing)} column" if missing else f"line {bad} is malformed"
        raise DataError(path, f"not a manifest synth4d generate wrote ({why}); move it away or pass another OUT")
    return {row["id"]: row for row in rows}


def _write_manifest(path, rows: dict):
    """Add or replace `rows` in the manifest at `path`, under a lock: jobs generating into one folder
    (e.g. --start 0 and --start 50 side by side) keep each other's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(".manifest.lock")
    try:  # never through a symbolic link, never truncating: the lock file only serves flock
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    except OSError as e:
        raise DataError(lock_path, f"cannot open the manifest lock ({e.strerror}; a symbolic link is refused)") from None
    with os.fdopen(fd) as lock:
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
