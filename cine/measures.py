"""Clinical measures from segmentation masks: ventricular volumes, ejection fractions, LV mass.

Axis vocabulary: a mask is (X, Y, Z) with labels 0 background, 1 RV, 2 MYO, 3 LV (ACDC);
a mask over the cycle is (X, Y, Z, T). Spacing is (sx, sy, sz) in mm.
Volumes are voxel counts x voxel volume, in mL (1 mL = 1000 mm^3); LV mass uses the
myocardial density 1.05 g/mL; EF = 100 (EDV - ESV) / EDV in %.
"""
from __future__ import annotations

import numpy as np

MYO_DENSITY = 1.05  # g/mL
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
