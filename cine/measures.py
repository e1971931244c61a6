"""Clinical measures from segmentation masks: ventricular volumes, ejection fractions, LV mass.

Axis vocabulary: a mask is (X, Y, Z) with labels 0 background, 1 RV, 2 MYO, 3 LV (ACDC);
a mask over the cycle is (X, Y, Z, T). Spacing is (sx, sy, sz) in mm.
Volumes are voxel counts x voxel volume, in mL (1 mL = 1000 mm^3); LV mass uses the
myocardial density 1.05 g/mL; EF = 100 (EDV - ESV) / EDV in %.
"""
from __future__ import annotations

import numpy as np

MYO_DENSITY = 1.05  # g/mL
# The clinical measures, the one list of their names: what a user may request, what the manifest
# reports and what the evaluation compares, always in this order.
MEASURES = {
    "lvedv": "LV end-diastolic volume (mL)", "lvesv": "LV end-systolic volume (mL)",
    "lvef": "LV ejection fraction (%)", "rvedv": "RV end-diastolic volume (mL)",
    "rvesv": "RV end-systolic volume (mL)", "rvef": "RV ejection fraction (%)",
    "lv_mass": "LV myocardial mass (g)",
}
_LABEL = {"rv": 1, "myo": 2, "lv": 3}


def _voxel_ml(spacing) -> float:
    sx, sy, sz = (float(s) for s in spacing[:3])
    return sx * sy * sz / 1000.0


def volumes(mask, spacing) -> dict:
    """LV cavity, RV cavity and myocardium volumes (mL) of one (X, Y, Z) mask."""
    mask = np.asarray(mask)
    ml = _voxel_ml(spacing)
    return {name: float(np.count_nonzero(mask == label)) * ml for name, label in _LABEL.items()}


def ejection_fraction(edv: float, esv: float) -> float:
    """EF in %; nan where the end-diastolic volume is zero (no cavity to eject from)."""
    return 100.0 * (edv - esv) / edv if edv > 0 else float("nan")


def clinical_measures(mask_ed, mask_es, spacing) -> dict:
    """LVEDV, LVESV, RVEDV, RVESV (mL), LV mass (g, at ED) and LVEF, RVEF (%) from the ED and ES masks."""
    ed, es = volumes(mask_ed, spacing), volumes(mask_es, spacing)
    return {
        "lvedv": ed["lv"], "lvesv": es["lv"], "rvedv": ed["rv"], "rvesv": es["rv"],
        "lv_mass": ed["myo"] * MYO_DENSITY,
        "lvef": ejection_fraction(ed["lv"], es["lv"]),
        "rvef": ejection_fraction(ed["rv"], es["rv"]),
    }


def volume_curve(mask4d, spacing) -> dict:
    """Per-frame LV, RV and myocardium volumes (mL) of an (X, Y, Z, T) mask: arrays of length T."""
    mask4d = np.asarray(mask4d)
    if mask4d.ndim != 4:
        raise ValueError(f"volume_curve expects an (X, Y, Z, T) mask, got shape {mask4d.shape}")
    ml = _voxel_ml(spacing)
    return {name: np.count_nonzero(mask4d == label, axis=(0, 1, 2)).astype(np.float64) * ml
            for name, label in _LABEL.items()}


def wall_thickness(mask, spacing) -> float:
    """Maximum LV myocardial wall thickness (mm) of one (X, Y, Z) mask, measured in-plane slice by slice.

    Through each myocardial voxel the local thickness is d_endo + d_epi - pixel: its in-plane distances
    to the nearest LV cavity voxel and the nearest voxel outside the LV (neither MYO nor LV), less one
    pixel since both are centre-to-centre (a wall k pixels across scores k pixels). Only slices
    with an LV cavity count (an apical cap has no endocardium). 0.0 when no slice has both.
    """
    mask = np.asarray(mask)
    sx, sy = float(spacing[0]), float(spacing[1])
    best = 0.0
    for z in range(mask.shape[2]):
        m = mask[:, :, z]
        lv, heart = m == _LABEL["lv"], (m == _LABEL["lv"]) | (m == _LABEL["myo"])
        # A nearest voxel always has a 4-neighbour nearer to the query, hence of the other kind:
        # only the voxels on the boundaries can be nearest.
        endo, epi = lv & _touches(~lv), ~heart & _touches(heart)
        myo = np.argwhere(m == _LABEL["myo"]) * (sx, sy)
        if len(myo) and endo.any() and epi.any():
            local = _nearest(myo, np.argwhere(endo) * (sx, sy)) + _nearest(myo, np.argwhere(epi) * (sx, sy))
            best = max(best, float(local.max()) - (sx + sy) / 2)
    return best


def _touches(a) -> np.ndarray:
    """(X, Y) bool: voxels with a 4-neighbour in a (outside the array counts as not in a)."""
    p = np.pad(a, 1)
    return p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _nearest(p, q) -> np.ndarray:
    """Distance from each point of p (n, 2) to the nearest point of q (m, 2), brute force in row blocks."""
    out = np.empty(len(p))
    rows = max(1, (1 << 20) // len(q))
    for i in range(0, len(p), rows):
        out[i:i + rows] = np.sqrt(((p[i:i + rows, None] - q[None]) ** 2).sum(-1).min(axis=1))  # (rows, m) -> (rows,)
    return out
