"""`synth4d export-nnunet`: real and synthetic data sets -> one nnU-Net v2 raw data set.

OUT/DatasetNNN_NAME/ holds imagesTr/<case>_0000.nii.gz (one 3D short-axis frame), labelsTr/<case>.nii.gz
(its mask, ACDC labels, which nnU-Net's own ACDC conversion names background 0, RV 1, MLV 2, LVC 3),
dataset.json and splits_final.json. A case is one labelled frame of one subject: the ED and ES
frames of a real subject (its labelled frames), the ED and ES frames of a synthetic one (or every
frame with frames="all"). Case names are <source>_<subject>_<frame>, the source being the data set
folder's name, so two sets with patient001 never collide. The five folds of splits_final.json are
grouped by subject (all frames of a subject in one fold) and drawn over real subjects only;
synthetic cases are in the training part of every fold and never validate, so they cannot inflate
nnU-Net's model selection.

A subject is synthetic when its set has the manifest `synth4d generate` writes, or a JSON sidecar
beside its image says "synthetic": true.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth4d.cine import UserError, atomic_folder
from synth4d.cine.datasets import scan
from synth4d.cine.measures import volume_curve
from synth4d.cine.nifti import Geometry, write

NNUNET_LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}   # nnU-Net's ACDC names for ACDC's labels
FOLDS = 5


@dataclass
class Case:
    name: str
    subject: str          # <source>_<subject id>: the unit the folds keep together
    synthetic: bool
    ref: object           # cine.subject.SubjectRef
    frame: int


def _tag(name: str) -> str:
    """A data set folder name made safe for case names."""
    return re.sub(r"[^A-Za-z0-9]+", "", name) or "set"


def _is_synthetic(ds) -> set:
    """Ids of the subjects of a data set that are synthetic (see the module docstring)."""
    manifest = Path(ds.root) / "manifest.csv"
    if manifest.is_file():
        try:
            with open(manifest, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                columns = set(reader.fieldnames or [])
                if {"id", "seed", "attempts"} <= columns and any(c.startswith("requested_") for c in columns):
                    return {r.id for r in ds.refs}
        except (OSError, UnicodeDecodeError, csv.Error):
            pass
    found = set()
    for ref in ds.refs:
        image = Path(ref.path)
        stem = image.name[:-len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        for side in (image.with_name(f"{ref.id}.json"), image.with_name(f"{stem}.json")):
            try:
                if json.loads(side.read_text()).get("synthetic") is True:
                    found.add(ref.id)
                    break
            except (OSError, ValueError, AttributeError):
                continue
    return found


def _frames(subject, synthetic: bool, frames: str) -> dict:
    """frame -> (X, Y, Z) labels of the cases a subject gives."""
    if synthetic:
        full = subject.full_mask
        if full is None and subject.masks and len(subject.masks) == subject.n_frames:
            full = np.stack([subject.masks[t] for t in range(subject.n_frames)], axis=3)
        if full is not None:
            if frames == "all":
                return {t: full[..., t] for t in range(full.shape[3])}
            ed = subject.ed
            es = subject.es if subject.es is not None else int(np.argmin(volume_curve(full, subject.spacing)["lv"]))
            return {t: full[..., t] for t in sorted({ed, es})}
    return dict(subject.masks)


def subjects_of(sources) -> list:
    """(source tag, SubjectRef, synthetic?) of every subject of the sources, in order."""
    tags, found = [], []
    for root in sources:
        ds = scan(root)
        tag = _tag(Path(root).resolve().name)
        while tag in tags:
            tag += "x"
        tags.append(tag)
        synthetic = _is_synthetic(ds)
        found += [(tag, ref, ref.id in synthetic) for ref in ds.refs]
    return found


def export_nnunet(sources, out, dataset_id: int, name: str, frames: str = "ed-es", ratio: float | None = None,
                  seed: int = 0, overwrite: bool = False) -> Path:
    """Write OUT/DatasetNNN_NAME (see the module docstring); returns its path."""
    if not 1 <= dataset_id <= 999:
        raise UserError(f"--id {dataset_id}: nnU-Net data set ids are 1 to 999")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,60}", name):
        raise UserError(f"--name {name[:60]!r}: use letters, digits, '_' or '-'")
    if frames not in ("ed-es", "all"):
        raise UserError(f"--frames {frames!r}: expected ed-es or all")
    target = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite to replace it")
    clash = [p.name for p in Path(out).glob(f"Dataset{dataset_id:03d}_*") if p.name != target.name] if Path(out).is_dir() else []
    if clash:
        raise UserError(f"{Path(out) / clash[0]} already uses id {dataset_id}; nnU-Net needs one folder per id")
    subjects = subjects_of(sources)
    n_real_subjects = sum(1 for _, _, syn in subjects if not syn)
    if n_real_subjects < FOLDS:
        raise UserError(f"{n_real_subjects} real labelled subject(s): the {FOLDS} folds need at least {FOLDS}")

    def write_all(tmp: Path):
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        written = {False: [], True: []}   # synthetic? -> [(case, subject key)]
        n_real = 0
        budget = None
        for tag, ref, synthetic in tqdm(sorted(subjects, key=lambda c: c[2]), desc="export-nnunet", unit="subject",
                                        file=sys.stderr, leave=False):
            if synthetic and budget is None:
                budget = float("inf") if ratio is None else ratio * n_real
            s = ref.load()
            chosen = _frames(s, synthetic, frames if synthetic else "ed-es")
            if not chosen:
                continue
            if synthetic and len(written[True]) + len(chosen) > budget:
                continue
            geom = Geometry(np.asarray(s.affine), tuple(s.spacing), None)
            for t, mask in sorted(chosen.items()):
                case = f"{tag}_{s.id}_{'ed' if t == s.ed else 'es' if t == s.es else f'f{t:02d}'}"
                write(tmp / "imagesTr" / f"{case}_0000.nii.gz", s.image[..., t], geom)
                write(tmp / "labelsTr" / f"{case}.nii.gz", mask, geom, kind="mask")
                written[synthetic].append((case, f"{tag}_{s.id}"))
            n_real += 0 if synthetic else len(chosen)
        real, syn = written[False], written[True]
        dataset = {"channel_names": {"0": "cineMRI"}, "labels": NNUNET_LABELS, "numTraining": len(real) + len(syn),
                   "file_ending": ".nii.gz", "name": name,
                   "description": f"{len(real)} real and {len(syn)} synthetic (synth4d) short-axis frames; "
                                  "synthetic cases only ever train (splits_final.json)",
                   "synth4d": {"sources": [str(p) for p in sources], "real_cases": len(real),
                               "synthetic_cases": len(syn), "frames": frames, "ratio": ratio, "seed": seed}}
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=1) + "\n")
        (tmp / "splits_final.json").write_text(json.dumps(splits(real, syn, seed), indent=1) + "\n")

    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_folder(target, write_all)


def splits(real: list, synthetic: list, seed: int) -> list:
    """FOLDS folds over real subjects (each subject's cases together); synthetic cases train in every fold."""
    keys = sorted({k for _, k in real}, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    fold_of = {k: i % FOLDS for i, k in enumerate(keys)}
    out = []
    for f in range(FOLDS):
        val = sorted(c for c, k in real if fold_of[k] == f)
        train = sorted(c for c, k in real if fold_of[k] != f) + sorted(c for c, _ in synthetic)
        out.append({"train": train, "val": val})
    return out
