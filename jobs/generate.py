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
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth4d.cine import FILE_MODE, DataError, UserError, atomic_folder, atomic_write, pid_running
from synth4d.cine.measures import MEASURES
from synth4d.cine.nifti import Geometry, write
from synth4d.jobs.synthesize import DEFAULT_SAMPLER, Sampling, Synthetic, load, manifest_row, subject_seed
from synth4d.weights.checkpoint import weights_identity

try:
    import fcntl           # POSIX: serialises the manifest updates of jobs writing into one folder
except ImportError:        # elsewhere: one job per output folder
    fcntl = None

CSV_COLUMNS = ("dx", *MEASURES, "frames")
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


def _names(i, layout):
    if layout == "acdc":
        sid = f"patient{i + 1:03d}"
        return sid, Path(sid) / f"{sid}_4d.nii.gz", Path(sid) / f"{sid}_4d_gt.nii.gz"
    sid = f"synth_{i:04d}"
    return sid, Path(f"{sid}.nii.gz"), Path(f"{sid}_mask.nii.gz")


def generate(out, dx=None, n=1, conditions=None, frames=30, slices=None, sampler=DEFAULT_SAMPLER, steps=None,
             guidance=2.0, seed=0, keyframes=12, weights=None, device="auto", layout="flat", start=0, overwrite=False,
             **given):
    """Generate subjects start .. start + n - 1 into `out`; yields one manifest row (dict) per subject."""
    out = Path(out)
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
    sampling = Sampling(sampler, steps, guidance, keyframes)
    _check_output(out)
    identity = weights_identity(weights)

    manifest = _read_manifest(out / "manifest.csv")
    pending = []
    for k, req in enumerate(requests):
        i = start + k
        sid, image_rel, mask_rel = _names(i, layout)
        done = manifest.get(sid)
        request = _request_id(req, sampling, identity, seed, i)
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
        subject = model.subject(req, i, seed, sampling)
        sid = _names(i, layout)[0]
        marker = atomic_write(out / PENDING / sid, lambda tmp: Path(tmp).write_text(str(os.getpid())))
        try:
            row = {**manifest_row(sid, subject, req, sampling), "weights": identity, "request": request,
                   "files": ";".join(map(str, _write(out, layout, i, subject)))}
            _write_manifest(out / "manifest.csv", {sid: row})
        except BaseException:  # an error or an interrupt here: a rerun redoes this subject
            marker.write_text(FAILED)
            raise
        marker.unlink()
        yield {**row, "files": [str(out / p) for p in row["files"].split(";")]}


def _request_id(req, sampling, identity, seed, index) -> str:
    """A digest of everything that makes subject `index`: the request, the sampling, the weights and the seed."""
    blob = json.dumps([req, dataclasses.asdict(sampling), identity, seed, index], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _interrupted(out, sid) -> bool:
    """Whether subject sid was being written by a process that failed or no longer runs."""
    try:
        text = (out / PENDING / sid).read_text()
    except OSError:
        return False
    return text == FAILED or (text.isdigit() and not pid_running(int(text)))


def _write(out, layout, i, subject: Synthetic) -> list:
    """The subject's files, written atomically: image as int16 in 0..1000 (the [-1, 1] model range), masks
    uint8; with the acdc layout the subject's folder, whole, with the ED and ES frames and Info.cfg too.
    Returns the paths relative to out."""
    sid, image_rel, mask_rel = _names(i, layout)
    image, labels, geom, es = np.round((subject.image + 1) * 500).astype(np.int16), subject.mask, subject.geometry, subject.es
    if layout == "flat":
        write(out / image_rel, image, geom)
        write(out / mask_rel, labels, geom, kind="mask")
        return [image_rel, mask_rel]
    frame_geom = Geometry(geom.affine, geom.spacing, None)
    names = [image_rel.name, mask_rel.name] + [f"{sid}_frame{t + 1:02d}{suffix}.nii.gz" for t in (0, es)
                                               for suffix in ("", "_gt")] + ["Info.cfg"]

    def write_folder(tmp):
        write(tmp / image_rel.name, image, geom)
        write(tmp / mask_rel.name, labels, geom, kind="mask")
        for t in (0, es):
            write(tmp / f"{sid}_frame{t + 1:02d}.nii.gz", image[..., t], frame_geom)
            write(tmp / f"{sid}_frame{t + 1:02d}_gt.nii.gz", labels[..., t], frame_geom, kind="mask")
        (tmp / "Info.cfg").write_text(f"ED: 1\nES: {es + 1}\nGroup: {subject.values['dx'] or ''}\n"
                                      f"NbFrame: {image.shape[3]}\n")

    atomic_folder(out / sid, write_folder)
    return [Path(sid) / name for name in names]


INT_COLUMNS = {"seed", "attempts", "ed", "es", "frames", "slices", "steps", "keyframes", *(f"given_{k}" for k in MEASURES)}
FLOAT_COLUMNS = {"slice_mm", "guidance", *(f"{w}_{k}" for w in ("requested", "measured") for k in MEASURES)}


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
