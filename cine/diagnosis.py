"""Whether clinical measures meet the defining criteria of an ACDC diagnostic group.

The ACDC groups (Bernard et al., IEEE TMI 2018) are defined with volumes indexed to body surface
area (BSA), which a generated subject does not have. Here each indexed threshold becomes an
absolute one at a reference adult BSA of REFERENCE_BSA m^2, and the criteria that need more than
volumes, EF and wall thickness are left out (named in NOT_CHECKED):

    NOR   normal: LVEF >= 50, LVEDV in 80-190 mL, RVEF >= 40, max LV wall < 15 mm
    DCM   dilated cardiomyopathy: LVEF < 40 and LVEDV > 190 mL (ACDC: > 100 mL/m^2)
    HCM   hypertrophic cardiomyopathy: LVEF > 55 and max LV wall >= 15 mm (ACDC also: mass > 110 g/m^2)
    MINF  myocardial infarction: LVEF < 50 (ACDC: < 40 with regional dysfunction, which is not checked)
    RV    abnormal right ventricle: RVEDV > 209 mL (ACDC: > 110 mL/m^2) or RVEF < 40

Measures are a dict with lvedv, rvedv (mL), lvef, rvef (%) and max_wall (mm, see
cine.measures.wall_thickness), as cine.measures.clinical_measures gives them plus max_wall.
"""
from __future__ import annotations

import math
from typing import Optional

REFERENCE_BSA = 1.9                    # m^2, a typical adult
LV_DILATED = 100 * REFERENCE_BSA       # mL: ACDC's 100 mL/m^2
RV_DILATED = 110 * REFERENCE_BSA       # mL: ACDC's 110 mL/m^2
HYPERTROPHY_MM = 15.0                  # max LV wall thickness at ED
NORMAL_LVEDV = (80.0, LV_DILATED)      # mL

CRITERIA = {
    "NOR": f"LVEF >= 50, LVEDV {NORMAL_LVEDV[0]:.0f}-{NORMAL_LVEDV[1]:.0f} mL, RVEF >= 40, "
           f"max LV wall < {HYPERTROPHY_MM:.0f} mm",
    "DCM": f"LVEF < 40 and LVEDV > {LV_DILATED:.0f} mL",
    "HCM": f"LVEF > 55 and max LV wall >= {HYPERTROPHY_MM:.0f} mm",
    "MINF": "LVEF < 50",
    "RV": f"RVEDV > {RV_DILATED:.0f} mL or RVEF < 40",
}
NOT_CHECKED = {
    "HCM": "LV mass index > 110 g/m^2 (BSA unknown)",
    "MINF": "regional wall-motion abnormality (several segments)",
}
NEEDS = {"NOR": ("lvef", "lvedv", "rvef", "max_wall"), "DCM": ("lvef", "lvedv"), "HCM": ("lvef", "max_wall"),
         "MINF": ("lvef",), "RV": ("rvedv", "rvef")}


def meets(dx: Optional[str], m: dict) -> Optional[bool]:
    """True / False whether measures m meet group dx's criteria; None for an unknown group or a missing measure."""
    if dx not in CRITERIA or any(m.get(k) is None or not math.isfinite(m[k]) for k in NEEDS[dx]):
        return None
    if dx == "NOR":
        return (m["lvef"] >= 50 and NORMAL_LVEDV[0] <= m["lvedv"] <= NORMAL_LVEDV[1] and m["rvef"] >= 40
                and m["max_wall"] < HYPERTROPHY_MM)
    if dx == "DCM":
        return m["lvef"] < 40 and m["lvedv"] > LV_DILATED
    if dx == "HCM":
        return m["lvef"] > 55 and m["max_wall"] >= HYPERTROPHY_MM
    if dx == "MINF":
        return m["lvef"] < 50
    return m["rvedv"] > RV_DILATED or m["rvef"] < 40


def volumes_fit(dx: Optional[str], m: dict) -> bool:
    """Whether volumes and EFs m can belong to group dx: its criteria less the wall thickness, which
    volumes do not fix. True for an unknown group (nothing to check)."""
    verdict = meets(dx, {**m, "max_wall": HYPERTROPHY_MM if dx == "HCM" else 0.0})
    return verdict is None or bool(verdict)
