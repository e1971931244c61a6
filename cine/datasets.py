"""Data set layouts (ACDC, M&Ms, plain folder + CSV), auto-detected, each giving SubjectRefs.

Axis vocabulary: a cine image is (X, Y, Z, T), a frame mask (X, Y, Z), a mask over the cycle
(X, Y, Z, T); labels inside the tool are ACDC's (0 background, 1 RV, 2 MYO, 3 LV); frame
indices are 0-based (ACDC's Info.cfg and frame file names are 1-based and converted here).

`scan` is cheap: it reads Info.cfg / CSV files and NIfTI headers (nibabel loads lazily), and
checks every header-level fact (4D where 4D is expected, image/mask shape and geometry,
ED/ES in range). Voxel data is read by SubjectRef.load(), which checks labels and intensities.
The one exception is a plain folder without CSV, where finding ED and ES needs the masks.
"""
from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from synth4d.cine import DIAGNOSES, DataError, nifti
from synth4d.cine.measures import volumes
from synth4d.cine.subject import Subject, SubjectRef

AFFINE_TOL_MM = 1e-3
_MNMS_TO_ACDC = np.array([0, 3, 2, 1], dtype=np.uint8)  # M&Ms 1 LV, 2 MYO, 3 RV -> ACDC 1 RV, 2 MYO, 3 LV
_DX_ALIASES = {"ARV": "RV"}  # M&Ms abnormal right ventricle is ACDC's RV group
_NO_DX = {"", "NA", "NAN", "NONE", "UNKNOWN"}
# Diagnosis codes of M&Ms (NOR, DCM, HCM, ARV, HHD, IHD, AHS, LVNC, Other) and M&Ms-2 (NOR, LV, HCM, ARR,
# FALL, CIA, RV, TRI) that are ACDC's groups by definition; every other code is kept as the subject's
# meta["diagnosis"] and counted as "other", its group unknown to the models. Not mapped, on purpose:
# IHD (ischaemic disease is not ACDC's MINF criterion of infarction with LVEF < 40 %), M&Ms-2 LV (a
# dilated LV is not dilated cardiomyopathy), ARR / FALL / CIA / TRI (they may dilate the RV, but ACDC's
# RV group is defined by RV volume or RVEF, which the code does not say).
_DX_FOREIGN = {"NOR": "NOR", "DCM": "DCM", "HCM": "HCM", "ARV": "RV", "RV": "RV"}
_DERIVED = re.compile(r"(_gt|_mask|_frame\d+)$")  # masks and single frames, not 4D cines


@dataclass
class Dataset:
    """What scan found: the layout, the usable subjects sorted by id, and the skipped files."""

    layout: str                  # "acdc", "mnms", "mnms2" or "folder"
    root: Path
    refs: list                   # list[SubjectRef], sorted by id
    problems: list = field(default_factory=list)  # [(path, reason)] of skipped subjects

    def load_each(self, desc: str):
        """Each subject loaded in id order, one at a time, with a progress bar on stderr."""
        for ref in tqdm(self.refs, desc=desc, unit="subject", file=sys.stderr, leave=False):
            yield ref.load()


def scan(root, skip_bad=False, csv_path=None) -> Dataset:
    """Detect the layout of root and list its subjects without reading any image data.

    The first unusable subject raises cine.DataError; with skip_bad it is recorded in problems.
    csv_path: the information CSV of an M&Ms or M&Ms-2 tree kept elsewhere.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a folder")
    layout, builders = _detect(root, csv_path)
    refs, problems = [], []
    for build in builders:
        try:
            refs.append(build())
        except DataError as e:
            if not skip_bad:
                raise
            problems.append((e.path, e.message))
    if not refs:
        path, reason = problems[0]
        raise DataError(root, f"no usable subject ({len(problems)} skipped; first: {path}: {reason})")
    return Dataset(layout, root, sorted(refs, key=lambda r: r.id), problems)


def _info_csv(root: Path, given: Optional[Path], key: str, name: str, example: str) -> tuple:
    """(path, (columns, rows)) of a data set's information CSV: the one given, else the first CSV with a
    `key` column in root or in one of its three parent folders (the published trees keep it beside
    Training/)."""
    if given is not None:
        table = _read_csv(Path(given))
        if key not in table[0]:
            raise DataError(given, f"no {key.upper()} column: not the {name} information CSV")
        return Path(given), table
    for folder in [root, *list(root.resolve().parents)[:3]]:
        for p in sorted(folder.glob("*.csv")):
            if _visible(p) and p.is_file():
                table = _read_csv(p)
                if key in table[0]:
                    return p, table
    raise DataError(root, f"{name} images found but no information CSV (a CSV with a {key.upper()} column, e.g. "
                          f"{example}) here or in the three folders above; pass --csv PATH")


def _detect(root: Path, csv_path: Optional[Path] = None):
    """(layout, [builder() -> SubjectRef, one per candidate subject])."""
    patients = sorted(d for base in (root, root / "training", root / "testing") if base.is_dir()
                      for d in base.iterdir() if d.is_dir() and _visible(d)
                      and (re.fullmatch(r"patient\d+", d.name) or (d / f"{d.name}_4d.nii.gz").is_file()))
    if patients:
        return "acdc", [partial(_acdc_ref, d) for d in patients]
    tables = {p: _read_csv(p) for p in sorted(root.glob("*.csv")) if _visible(p) and not p.is_dir()}
    from synth4d.cine import mnms2
    cines2 = mnms2.cines(root)
    if cines2:  # M&Ms-2: dataset_information.csv with SUBJECT_CODE
        info, columns_rows = _info_csv(root, csv_path, "subject_code", "M&Ms-2", "dataset_information.csv")
        rows = _by_key(info, columns_rows[1], "subject_code")
        return "mnms2", [partial(mnms2.ref, p, rows, info) for p in cines2]
    cines = sorted(p for p in root.rglob("*") if p.name.lower().endswith("_sa.nii.gz") and _visible(p) and p.is_file())
    if cines:  # M&Ms: the information CSV (e.g. 211230_M&Ms_Dataset_information_diagnosis_opendataset.csv)
        info, columns_rows = _info_csv(root, csv_path, "external_code", "M&Ms",
                                       "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv")
        rows = _by_key(info, columns_rows[1], "external_code")
        return "mnms", [partial(_mnms_ref, p, root, rows, info) for p in cines]
    images = sorted(p for p in root.iterdir()
                    if p.is_file() and _visible(p) and _is_nifti(p) and not _DERIVED.search(_stem(p)))
    if images:
        keyed = {p: "subject" if "subject" in columns else "id"
                 for p, (columns, _) in tables.items() if {"subject", "id"} & set(columns)}
        if len(keyed) > 1:
            raise DataError(root, f"several CSV files with a subject column ({', '.join(p.name for p in keyed)}); keep one")
        table, key = next(iter(keyed.items()), (None, None))
        rows = _by_key(table, tables[table][1], key) if table else {}
        return "folder", [partial(_folder_ref, p, rows, table) for p in images]
    from synth4d.cine import dicom
    folders = dicom.subject_folders(root)
    if folders:  # DICOM cine: one series per folder
        return "dicom", [partial(dicom.ref, d, root) for d in folders]
    raise DataError(root, "no subjects found (expected ACDC patientNNN/ folders, M&Ms <code>/<code>_sa.nii.gz "
                          "with an information CSV, M&Ms-2 NNN/NNN_SA_CINE.nii.gz, 4D NIfTI files, or folders of "
                          "short-axis cine DICOM files)")


# ---- one subject per layout -------------------------------------------------------------

def _acdc_ref(folder: Path) -> SubjectRef:
    sid, cfg_path = folder.name, folder / "Info.cfg"
    cfg = _read_cfg(cfg_path)
    image = folder / f"{sid}_4d.nii.gz"
    shape, affine = nifti.peek(image, 4)
    n = shape[3]
    if "nbframe" in cfg and _number(cfg_path, "NbFrame", cfg["nbframe"], int) != n:
        raise DataError(cfg_path, f"NbFrame {cfg['nbframe']} but {image.name} has {n} frames")
    ed = _frame(cfg_path, "ED", cfg.get("ed"), n, base=1)
    es = _frame(cfg_path, "ES", cfg.get("es"), n, base=1)
    dx = cfg.get("group", "").upper() or None
    if dx is not None and dx not in DIAGNOSES:
        raise DataError(cfg_path, f"unknown Group '{cfg['group']}' (expected one of {', '.join(DIAGNOSES)})")
    meta = {k: v for k, v in cfg.items() if k not in ("ed", "es", "group", "nbframe", "height", "weight", "labels")}
    meta.update(_numbers(cfg_path, cfg, ("height", "weight")))
    mnms = _label_order(cfg_path, cfg.get("labels"))
    frame_masks = _frame_masks(folder, sid, shape, affine)
    full = folder / f"{sid}_4d_gt.nii.gz"
    files = {"image": str(image), "info": str(cfg_path)}
    if full.exists():
        _check_match(full, nifti.peek(full, 4), shape, affine)
        files["full_mask"] = str(full)
    return _ref(sid, "acdc", files, ed, es, dx, meta, frame_masks=frame_masks, full_mask=files.get("full_mask"),
                mnms_labels=mnms)


def _mnms_ref(image: Path, root: Path, rows: dict, csv_path: Path) -> SubjectRef:
    sid = image.name[: -len("_sa.nii.gz")]
    gt = next((p for p in image.parent.iterdir() if p.name.lower() == f"{sid}_sa_gt.nii.gz".lower()), None)
    if sid not in rows:
        raise DataError(image, f"no row for '{sid}' in {csv_path.name}")
    row = rows[sid]
    shape, affine = nifti.peek(image, 4)
    ed = _frame(csv_path, f"{sid}: ED", row.get("ed"), shape[3], base=0)
    es = _frame(csv_path, f"{sid}: ES", row.get("es"), shape[3], base=0)
    meta = {k: row[c] for k, c in (("vendor", "vendor"), ("vendor_name", "vendorname"), ("centre", "centre"),
                                   ("sex", "sex")) if row.get(c)}
    meta.update(_numbers(csv_path, row, ("age", "height", "weight"), prefix=f"{sid}: "))
    meta["split"] = image.parent.parent.relative_to(root).as_posix()
    files = {"image": str(image), "info": str(csv_path)}
    if gt is not None:
        _check_match(gt, nifti.peek(gt, 4), shape, affine)
        files["mask"] = str(gt)
    dx, code = _foreign_dx(row.get("pathology"))
    if code:
        meta["diagnosis"] = code
    return _ref(sid, "mnms", files, ed, es, dx, meta, mask4d=files.get("mask"), mnms_labels=True)


def _folder_ref(image: Path, rows: dict, csv_path: Optional[Path]) -> SubjectRef:
    sid = _stem(image)
    shape, affine = nifti.peek(image, 4)
    n = shape[3]
    files = {"image": str(image)}
    mask4d = next((p for suffix in ("_gt", "_mask") for ext in (".nii.gz", ".nii")
                   if (p := image.with_name(sid + suffix + ext)).exists()), None)
    if mask4d is not None:
        _check_match(mask4d, nifti.peek(mask4d, 4), shape, affine)
        files["mask"] = str(mask4d)
    frame_masks = _frame_masks(image.parent, sid, shape, affine)
    ed, es, dx, meta, mnms = 0, None, None, {}, False
    if sid in rows:
        row, files["info"] = rows[sid], str(csv_path)
        ed = _frame(csv_path, f"{sid}: ed", row.get("ed"), n, base=0, required=False) or 0
        es = _frame(csv_path, f"{sid}: es", row.get("es"), n, base=0, required=False)
        dx = _dx(row.get("dx"))
        if dx is not None and dx not in DIAGNOSES:   # as in ACDC's Info.cfg: a typo is not a new group
            raise DataError(csv_path, f"{sid}: unknown dx {row['dx']!r} (expected one of {', '.join(DIAGNOSES)}, "
                                      "or empty for unknown)")
        meta = {k: v for k, v in row.items() if v and k not in ("subject", "id", "dx", "ed", "es", "labels")}
        meta.update(_numbers(csv_path, row, ("height", "weight"), prefix=f"{sid}: "))
        mnms = _label_order(csv_path, row.get("labels"), f"{sid}: ")
    else:
        ed, es = _ed_es_from_masks(files.get("mask"), frame_masks, ed, es)
    return _ref(sid, "folder", files, ed, es, dx, meta, frame_masks=frame_masks, mask4d=files.get("mask"),
                mnms_labels=mnms)


def _label_order(path, value, where="") -> bool:
    """Whether a subject's masks are in M&Ms order (1 LV, 3 RV): a Labels / labels field of acdc or mnms."""
    value = (value or "acdc").strip().lower()
    if value not in ("acdc", "mnms"):
        raise DataError(path, f"{where}labels {value[:40]!r} is not acdc (1 RV, 2 MYO, 3 LV) or mnms (1 LV, 2 MYO, 3 RV)")
    return value == "mnms"


def _ed_es_from_masks(mask4d, frame_masks, ed, es):
    """With masks at exactly two frames, ED is the one with the larger LV cavity, ES the other."""
    if mask4d:
        m = _labels(mask4d, nifti.read(mask4d, ndim=4, kind="mask")[0])
        frames = {t: m[..., t] for t in _labelled_frames(m)}
    elif len(frame_masks) == 2:
        frames = {t: _labels(p, nifti.read(p, ndim=3, kind="mask")[0]) for t, p in frame_masks.items()}
    else:
        return ed, es
    if len(frames) != 2:
        return ed, es
    first, second = sorted(frames)
    lv = {t: volumes(frames[t], (1, 1, 1))["lv"] for t in frames}
    return (first, second) if lv[first] >= lv[second] else (second, first)


def _ref(sid, layout, files, ed, es, dx, meta, **masks) -> SubjectRef:
    files.update({f"mask_frame{t + 1:02d}": p for t, p in masks.get("frame_masks", {}).items()})  # 1-based, as on disk
    loader = _Loader(sid, files["image"], ed, es, dx, meta, **masks)
    return SubjectRef(sid, layout, files["image"], ed, es, dx, meta, files, loader)


# ---- reading a subject --------------------------------------------------------------------

@dataclass
class _Loader:
    """Reads one subject's files into a Subject; a plain dataclass so data-loader workers can pickle it."""

    id: str
    image: str
    ed: int
    es: Optional[int]
    dx: Optional[str]
    meta: dict
    frame_masks: dict = field(default_factory=dict)  # 0-based frame -> (X, Y, Z) mask file
    mask4d: Optional[str] = None                      # (X, Y, Z, T) labels at some frames, zero elsewhere
    full_mask: Optional[str] = None                   # (X, Y, Z, T) labels at every frame, evaluation only
    mnms_labels: bool = False

    def __call__(self) -> Subject:
        image, geom = nifti.read(self.image, ndim=4)
        masks = {t: _labels(p, nifti.read(p, ndim=3, kind="mask")[0], self.mnms_labels)
                 for t, p in self.frame_masks.items()}
        if self.mask4d:
            m = _labels(self.mask4d, nifti.read(self.mask4d, ndim=4, kind="mask")[0], self.mnms_labels)
            masks.update({t: np.ascontiguousarray(m[..., t]) for t in _labelled_frames(m)})
        full = (_labels(self.full_mask, nifti.read(self.full_mask, ndim=4, kind="mask")[0], self.mnms_labels)
                if self.full_mask else None)
        return Subject(self.id, image, geom.affine, geom.spacing, geom.frame_ms, dict(sorted(masks.items())),
                       self.ed, self.es, self.dx, dict(self.meta), full, self.image)


def _labels(path, mask: np.ndarray, mnms=False) -> np.ndarray:
    if mask.size and mask.max() > 3:
        unknown = [int(v) for v in np.unique(mask) if v > 3]
        names = "1 LV, 2 MYO, 3 RV (M&Ms)" if mnms else "1 RV, 2 MYO, 3 LV"
        raise DataError(path, f"unknown label values {unknown} (expected 0 background, {names})")
    return _MNMS_TO_ACDC[mask] if mnms else mask


def _labelled_frames(mask4d: np.ndarray) -> list:
    return [int(t) for t in np.flatnonzero(mask4d.reshape(-1, mask4d.shape[3]).any(axis=0))]  # (X*Y*Z, T) -> (T,)


# ---- headers and metadata files -----------------------------------------------------------

def _check_match(path, peeked, shape, affine):
    """A mask must lie on its image's voxel grid: same (X, Y, Z[, T]) and the same affine."""
    mshape, maffine = peeked
    if mshape != shape[: len(mshape)]:
        raise DataError(path, f"mask shape {mshape} does not match the image shape {shape[: len(mshape)]}")
    diff = float(np.abs(maffine - affine).max())
    if diff > AFFINE_TOL_MM:
        raise DataError(path, f"mask geometry (affine) differs from the image's by up to {diff:.4g} mm")


def _frame_masks(folder: Path, sid: str, shape, affine) -> dict:
    """0-based frame -> path of every <sid>_frameFF_gt.nii[.gz] (FF 1-based), checked against the image."""
    found = {}
    for p in sorted(folder.glob(f"{sid}_frame*_gt.nii*")):
        m = re.fullmatch(rf"{re.escape(sid)}_frame(\d+)_gt\.nii(\.gz)?", p.name)
        if m:
            t = _frame(p, "frame number in the file name", m.group(1), shape[3], base=1)
            _check_match(p, nifti.peek(p, 3), shape, affine)
            found[t] = str(p)
    return found


def _text(path: Path) -> str:
    """A metadata file's text (UTF-8, an Excel byte-order mark allowed); DataError if it cannot be read as such."""
    if not path.is_file():
        raise DataError(path, f"missing {path.name}" if not path.exists() else "not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text (save it as UTF-8)") from None
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror})") from None


def _read_cfg(path: Path) -> dict:
    """Info.cfg 'Key: value' lines -> {key (lower case): value}; a key given twice is an error."""
    cfg, where = {}, {}
    for i, line in enumerate(_text(path).splitlines(), 1):
        if line.strip():
            key, sep, value = line.partition(":")
            if not sep:
                raise DataError(path, f"line {i} is not 'Key: value': {line.strip()[:60]!r}")
            key = key.strip().lower()
            if key in cfg:
                raise DataError(path, f"line {i}: {key!r} given twice (also line {where[key]})")
            cfg[key], where[key] = value.strip(), i
    return cfg


def _read_csv(path: Path):
    """(columns, [(line, row dict)]); column names lower-case with spaces as underscores ("External code").
    Comma-separated, well-formed, no row longer than the header: otherwise a DataError naming the line."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), strict=True)
    try:
        header = next(reader, [])
        if len(header) == 1 and ";" in header[0]:
            raise DataError(path, "semicolon-separated; synth4d reads comma-separated CSV")
        columns = [re.sub(r"\s+", "_", c.strip().lower()) for c in header]
        rows = []
        for values in reader:
            if len(values) > len(columns):
                raise DataError(path, f"line {reader.line_num}: {len(values)} fields for {len(columns)} columns")
            rows.append((reader.line_num, {c: v.strip() for c, v in zip(columns, values) if c}))
    except csv.Error as e:
        raise DataError(path, f"line {reader.line_num}: not a well-formed CSV row ({e})") from None
    return columns, rows


def _by_key(path, rows, key) -> dict:
    """{row[key]: row}; the same key on two lines is an error."""
    out, where = {}, {}
    for line, row in rows:
        k = row.get(key)
        if k:
            if k in out:
                raise DataError(path, f"line {line}: {key} {k!r} appears twice (also line {where[k]})")
            out[k], where[k] = row, line
    return out


def _number(path, name, value, kind=float):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"{name} {value!r} is not a number") from None
    if not np.isfinite(x) or (kind is int and x != round(x)):
        raise DataError(path, f"{name} {value!r} is not a {'whole' if kind is int else 'finite'} number")
    return kind(x)


def _numbers(path, row: dict, keys, prefix="") -> dict:
    """Those of the fields keys that row fills, as numbers (a malformed one is an error)."""
    return {k: _number(path, prefix + k, row[k]) for k in keys if row.get(k)}


def _frame(path, name, value, n_frames, base, required=True) -> Optional[int]:
    """A frame number from a metadata field (1-based when base is 1), as a checked 0-based index."""
    if value in (None, ""):
        if required:
            raise DataError(path, f"missing {name}")
        return None
    t = _number(path, name, value, int) - base
    if not 0 <= t < n_frames:
        first = "1-based" if base else "0-based"
        raise DataError(path, f"{name} {value} is out of range for {n_frames} frames ({first})")
    return t


def _dx(value) -> Optional[str]:
    code = (value or "").strip().upper()
    return None if code in _NO_DX else _DX_ALIASES.get(code, code)


def _foreign_dx(value) -> tuple:
    """(ACDC group or None, the code as given or None) of another data set's diagnosis code."""
    code = (value or "").strip().upper()
    if code in _NO_DX:
        return None, None
    return _DX_FOREIGN.get(code), code


def _visible(p: Path) -> bool:
    """Hidden names (temporary files of an interrupted write among them) are never data."""
    return not p.name.startswith(".")


def _is_nifti(p: Path) -> bool:
    return p.name.endswith((".nii.gz", ".nii"))


def _stem(p: Path) -> str:
    return p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]
