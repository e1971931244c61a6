"""The M&Ms-2 layout (the STACOM 2021 right-ventricle challenge: 360 subjects, three vendors, RV diseases).

As published: one folder per subject, NNN/NNN_SA_CINE.nii.gz (the 4D short-axis cine), NNN_SA_ED.nii.gz
and NNN_SA_ES.nii.gz (the end-diastolic and end-systolic volumes, 3D) with NNN_SA_ED_gt.nii.gz and
NNN_SA_ES_gt.nii.gz (labels 1 LV, 2 MYO, 3 RV, mapped here to 1 RV, 2 MYO, 3 LV), long-axis files
(ignored), and dataset_information.csv (SUBJECT_CODE, DISEASE, FIELD, VENDOR, SCANNER, ...). File
names are matched case-insensitively.

ED and ES are not given as frame indices: each 3D volume is matched to the cine frame it equals
(smallest mean absolute difference). A match must be clear: the best frame within MATCH_TOL of the
cine's intensity range, and every other frame at least twice as far; ED and ES on different frames.
Otherwise the subject is refused, naming the file. The match reads voxel data, so it happens when
the subject is loaded; the scan reads headers only, as for every layout.

Axis vocabulary: a cine (X, Y, Z, T), a volume or mask (X, Y, Z).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from synth4d.cine import DataError, nifti
from synth4d.cine.datasets import _check_match, _foreign_dx, _labels, _numbers, _visible
from synth4d.cine.subject import Subject, SubjectRef

MATCH_TOL = 0.01
CINE = re.compile(r"(.+)_sa_cine\.nii\.gz", re.IGNORECASE)


def cines(root: Path) -> list:
    """The 4D short-axis cines of an M&Ms-2 tree under root."""
    return sorted(p for p in root.rglob("*") if CINE.fullmatch(p.name) and _visible(p) and p.is_file())


def _sibling(folder: Path, name: str) -> Optional[Path]:
    """The file of folder whose name equals `name` ignoring case, or None."""
    want = name.lower()
    return next((p for p in sorted(folder.iterdir()) if p.name.lower() == want), None)


def ref(cine: Path, rows: dict, csv_path: Path) -> SubjectRef:
    sid = CINE.fullmatch(cine.name).group(1)
    row = rows.get(sid) or rows.get(sid.lstrip("0")) or rows.get(sid.zfill(3))
    if row is None:
        raise DataError(cine, f"no row for subject {sid!r} in {csv_path.name} (SUBJECT_CODE)")
    shape, affine = nifti.peek(cine, 4)
    files = {"image": str(cine), "info": str(csv_path)}
    for phase in ("ed", "es"):
        volume = _sibling(cine.parent, f"{sid}_SA_{phase}.nii.gz")
        gt = _sibling(cine.parent, f"{sid}_SA_{phase}_gt.nii.gz")
        if gt is not None and volume is None:
            raise DataError(gt, f"a {phase.upper()} mask without its volume {sid}_SA_{phase.upper()}.nii.gz "
                                "(needed to find its frame)")
        for path in (volume, gt):
            if path is not None:
                _check_match(path, nifti.peek(path, 3), shape, affine)
        if volume is not None:
            files[f"{phase}_volume"] = str(volume)
        if gt is not None:
            files[f"mask_{phase}"] = str(gt)
    dx, code = _foreign_dx(row.get("disease"))
    meta = {k: row[k] for k in ("vendor", "scanner", "field") if row.get(k)}
    if code:
        meta["diagnosis"] = code
    meta.update(_numbers(csv_path, row, ("height", "weight"), prefix=f"{sid}: "))
    loader = _Loader(sid, str(cine), dx, meta, files.get("ed_volume"), files.get("es_volume"),
                     files.get("mask_ed"), files.get("mask_es"))
    return SubjectRef(sid, "mnms2", str(cine), 0, None, dx, meta, files, loader)


def match_frame(cine: np.ndarray, volume: np.ndarray, path) -> int:
    """The frame of cine (X, Y, Z, T) that volume (X, Y, Z) is; DataError naming path when unclear."""
    lo, hi = np.percentile(cine, (1, 99))
    span = max(float(hi - lo), 1e-6)
    diff = np.abs(cine - volume[..., None]).mean(axis=(0, 1, 2)) / span       # (T,)
    order = np.argsort(diff)
    best = int(order[0])
    if diff[best] > MATCH_TOL:
        raise DataError(path, f"matches no frame of the cine (closest: frame {best + 1}, "
                              f"{diff[best]:.1%} of the intensity range apart)")
    if len(order) > 1 and diff[order[1]] < 2 * diff[best] + 1e-6:
        raise DataError(path, f"matches frames {best + 1} and {int(order[1]) + 1} of the cine about equally: "
                              "ambiguous")
    return best


@dataclass
class _Loader:
    """Reads one M&Ms-2 subject; a plain dataclass so data-loader workers can pickle it."""

    id: str
    image: str
    dx: Optional[str]
    meta: dict
    ed_volume: Optional[str]
    es_volume: Optional[str]
    ed_mask: Optional[str]
    es_mask: Optional[str]

    def __call__(self) -> Subject:
        image, geom = nifti.read(self.image, ndim=4)
        frames, masks = {}, {}
        for phase, volume, mask in (("ed", self.ed_volume, self.ed_mask), ("es", self.es_volume, self.es_mask)):
            if volume is None:
                continue
            frames[phase] = match_frame(image, nifti.read(volume, ndim=3)[0], volume)
            if mask is not None:
                masks[frames[phase]] = _labels(mask, nifti.read(mask, ndim=3, kind="mask")[0], mnms=True)
        if "ed" in frames and frames.get("es") == frames["ed"]:
            raise DataError(self.es_volume, f"ED and ES match the same cine frame ({frames['ed'] + 1})")
        return Subject(self.id, image, geom.affine, geom.spacing, geom.frame_ms, dict(sorted(masks.items())),
                       frames.get("ed", 0), frames.get("es"), self.dx, dict(self.meta), None, self.image)
