"""The phantom's heart: drawn clinical targets, static shape, motion over one cycle, voxelisation.

Axis vocabulary: D depths below the end-diastolic base plane (mm, the LV long axis), N_THETA
angles theta about that axis (theta 0 along +X, towards +Y), P in-plane pixels; shape tables
are (D, N_THETA), pixel arrays (D, P). Volumes are mL in the drawn targets and mm^3 in the
solver, lengths mm, mass g.

The heart is built in polar coordinates about the LV long axis. At depth d below the
end-diastolic base plane and angle theta it has an endocardial radius Rn, an epicardial radius
Re and an outer RV radius Ro; the RV cavity is Re < r < Ro, a crescent on the septal side.
Every frame's radii are solved so that the volumes its mask shows (voxel counts at the slice
centres x voxel volume) meet the drawn clinical values, each scale in closed form, then once
more with the targets corrected by the ratio measured on the voxelised mask (cine.phantom).
"""
from __future__ import annotations

import numpy as np

N_THETA = 256
_THETA = 2 * np.pi * np.arange(N_THETA) / N_THETA
DTHETA = 2 * np.pi / N_THETA
MYO_DENSITY = 1.05  # g/mL, as cine.measures

# Per ACDC group: LVEDV (mL), LVEF (%), LV mass / LVEDV (g/mL), LV length / radius.
GROUPS = {
# The mass ratios are drawn loosely (0.5-1.05 g/mL spans normal hearts from lean to heavy) so that
# a request anywhere in a group's range has training subjects near it.
    "NOR": dict(lvedv=(100, 180), lvef=(55, 75), mass=(0.5, 1.05), sph=(2.6, 3.2)),
    "DCM": dict(lvedv=(200, 350), lvef=(15, 40), mass=(0.35, 0.7), sph=(1.9, 2.4)),
    "HCM": dict(lvedv=(80, 150), lvef=(60, 80), mass=(1.3, 2.2), sph=(2.5, 3.0)),
    "MINF": dict(lvedv=(130, 220), lvef=(30, 50), mass=(0.5, 1.05), sph=(2.3, 2.9)),
    "RV": dict(lvedv=(100, 170), lvef=(55, 70), mass=(0.5, 1.05), sph=(2.6, 3.2)),
}


def draw_parameters(rng, dx):
    """Clinical targets for one subject of group dx: volumes (mL), mass (g), EF (%), body size."""
    g, u = GROUPS[dx], rng.uniform
    lvedv, lvef = u(*g["lvedv"]), u(*g["lvef"])
    if dx == "RV":
        rvedv, rvef = u(170, 300), u(20, 40)
    else:
        rvedv, rvef = lvedv * u(0.8, 1.3), u(45, 65)
        # DCM: the RV from normal to dilated (biventricular disease), never scaled with the LV alone
        rvedv = min(lvedv * u(0.5, 1.15), u(130, 320)) if dx == "DCM" else rvedv
    height = float(np.clip(rng.normal(172, 9), 150, 198))
    return dict(lvedv=lvedv, lvesv=lvedv * (1 - lvef / 100), rvedv=rvedv, rvesv=rvedv * (1 - rvef / 100),
                lv_mass=lvedv * u(*g["mass"]), lvef=lvef, rvef=rvef,
                height=round(height, 1), weight=round(u(19, 32) * (height / 100) ** 2, 1))


def _turn(angle):
    """|angle| wrapped into [0, pi]: the angular distance an angle difference stands for."""
    return np.abs(np.angle(np.exp(1j * angle)))


def _window(centre, half, soft=0.35):
    """Angular plateau on _THETA: 1 within `half` radians of centre, ramping to 0 over `soft`."""
    delta = _turn(_THETA - centre)
    return np.clip((half + soft / 2 - delta) / soft, 0, 1)


def _rv_scale(ro2, re2, target):
    """x with sum(max(x^2 ro2 - re2, 0)) = target: piecewise quadratic in x, solved on the segment crossing it."""
    keep = ro2 > 0
    ro2, re2 = ro2[keep], re2[keep]
    order = np.argsort(re2 / ro2)
    opens, a, b = (re2 / ro2)[order], np.cumsum(ro2[order]), np.cumsum(re2[order])  # x^2 at which each ray opens
    j = max(int(np.searchsorted(opens * a - b, target)), 1) - 1
    return float(np.sqrt((target + b[j]) / a[j]))


class Heart:
    """Static shape of one heart (functions of angle on _THETA, lengths in mm) and its slice stack."""

    def __init__(self, rng, dx, p, slices):
        g, u = GROUPS[dx], rng.uniform
        self.u0 = u(0.12, 0.25)                      # widest cross-section, as a fraction of the length
        self.rv_dir = np.pi + 0.5 + u(-0.35, 0.35)   # from the LV axis towards the RV (upper left)
        self.ell = 1 + u(0, 0.08) * np.cos(2 * (_THETA - u(0, np.pi)))
        self.wall = 1 + 0.08 * np.cos(_THETA - u(0, 2 * np.pi))
        self.infarct, self.u_scar = np.zeros(N_THETA), u(0.15, 0.45)
        if dx == "HCM":   # asymmetric septal hypertrophy
            self.wall = self.wall + u(0.5, 0.9) * _window(self.rv_dir, u(0.5, 0.8))
        if dx == "MINF":  # a transmural scar, thinner and akinetic from u_scar to the apex
            self.infarct = _window(self.rv_dir + np.pi + u(-1.5, 1.5), u(0.5, 0.8))
            self.wall = self.wall * (1 - 0.4 * self.infarct)
        self.cap = u(6, 9) * (1.3 if dx == "HCM" else 1.0)          # apical wall (mm)
        sph = u(*g["sph"])
        mean_p2 = 1 - ((1 - self.u0) ** 3 + self.u0 ** 3) / (3 * (1 - self.u0) ** 2)
        self.R = (p["lvedv"] * 1000 / (np.pi * sph * mean_p2)) ** (1 / 3)
        self.apex = self.R * sph                     # cavity apex depth at ED
        self.rv_len = u(0.75, 0.9)                   # RV length / LV cavity length
        self.descent = u(8, 14) * min(1.0, p["lvef"] / 60)          # base descent at ES (mm)
        self.rv_wall = u(3, 5)                       # RV free wall (mm)
        # Trabeculation: dark muscle fingers reaching into the cavities from the wall, as a fraction of
        # the LV cavity radius (free wall, not the smooth septum) and of the RV cavity's width; one
        # moderator band crosses the RV at mid to apical levels. The masks count them as cavity (ACDC).
        def fingers(n, width, depth):
            spikes = depth * u(0.3, 1, (n, 1)) * np.exp(-np.square(_turn(_THETA - u(0, 2 * np.pi, (n, 1))))
                                                        / (2 * np.square(width * u(0.6, 1.4, (n, 1)))))
            return spikes.max(0)
        self.trab_lv = fingers(int(rng.integers(10, 20)), 0.05, u(0.08, 0.2) * (1.5 if dx == "DCM" else 1)) \
            * (1 - _window(self.rv_dir, 0.9))
        self.trab_rv = fingers(int(rng.integers(6, 12)), 0.06, u(0.15, 0.35))
        self.band = (u(0.5, 0.75), np.exp(-np.square(_turn(_THETA - self.rv_dir - u(-0.5, 0.5)))
                                          / (2 * 0.04 ** 2)))   # (relative depth, angular profile)
        harmonics = np.cos(np.arange(1, 4)[:, None] * _THETA - u(0, 2 * np.pi, (3, 1)))   # (3, N_THETA)
        self.fat = np.clip(u(0.5, 2) + u(0.5, 1.5, 3) @ harmonics, 0, 6)  # epicardial fat thickness (mm)
        # Slice stack: slice 0 centred just below the base; thickness from the length and the count.
        depth = self.apex + self.cap
        if depth / (slices - 0.4) > 10:
            slices = min(12, int(np.ceil(depth / 10 + 0.4)))
        self.sz = float(np.clip(depth / (slices - 0.4), 5, 10))
        self.centres = (np.arange(slices) + 0.3) * self.sz
        # ED scales in closed form on the slice-sampled volumes: LV ~ R^2, MYO = A W + B W^2.
        self.W, self.r0, w = 1.0, np.zeros(N_THETA), 0.5 * DTHETA * self.sz
        self.R *= np.sqrt(p["lvedv"] * 1000 / (w * self.shape(self.centres, 0.0)[0] ** 2).sum())
        _, _, lin, quad, _ = self.shape(self.centres, 0.0)
        a, b = w * lin.sum(), w * quad.sum()
        self.W = (-a + np.sqrt(a * a + 4 * b * p["lv_mass"] / MYO_DENSITY * 1000)) / (2 * b)
        self.mid = (self.centres > 0.2 * self.apex) & (self.centres < 0.8 * self.apex)  # mid-ventricular slices
        if dx == "HCM":  # ACDC's criterion is a wall of 15 mm or more: raise the mass where the draw falls short
            rn, re, _ = self.radii(self.shape(self.centres, 0.0), 1.0, 1.0, 0.0)
            self.W *= max(1.0, 16 / (re - rn)[self.mid].max())     # ED thickness is linear in W
            p["lv_mass"] = MYO_DENSITY * (a * self.W + b * self.W ** 2) / 1000
        # RV outer wall: where each ray from the LV axis leaves an ellipse centred `dist` towards
        # the RV (the axis lies inside it, so once).
        re_mid = self.R + self.W
        dist, along, across = u(0.3, 0.5) * re_mid, u(0.85, 1.1) * re_mid, u(1.25, 1.5) * re_mid
        c, s = np.cos(_THETA - self.rv_dir), np.sin(_THETA - self.rv_dir)
        qa, qb, qc = c ** 2 / along ** 2 + s ** 2 / across ** 2, -2 * dist * c / along ** 2, dist ** 2 / along ** 2 - 1
        self.r0 = (-qb + np.sqrt(qb ** 2 - 4 * qa * qc)) / (2 * qa)

    def shape(self, d, base):
        """Scale-free pieces at depths d (D,) with the base plane at `base`, each (D, N_THETA):
        ED endocardium at the same relative depth, kinetic weight (0 = akinetic), the wall
        terms (Re^2 - Rn^2 at ED = W lin + W^2 quad) and the RV outer radius at unit scale."""
        d = np.asarray(d, dtype=np.float64)[:, None]
        length = self.apex - base
        u = (d - base) / length
        inside = (u >= 0) & (u <= 1)
        ed = self.R * self.ell * np.sqrt(np.clip(1 - ((u - self.u0) / (1 - self.u0)) ** 2, 0, 1)) * inside
        kin = 1 - 0.95 * self.infarct * np.clip((u - self.u_scar) / 0.15, 0, 1)
        t = self.wall * (1 - 0.25 * np.clip(u, 0, 1)) * inside   # wall thickness per unit W, thinning to the apex
        cap = np.clip(1 - ((d - self.apex) / self.cap) ** 2, 0, 1) * (d > self.apex)
        ro = self.r0 * np.sqrt(np.clip(1 - ((d - base) / (self.rv_len * length)) ** 2, 0, 1)) * (d >= base)
        return ed, kin, 2 * ed * t, t ** 2 + (0.75 * self.wall) ** 2 * cap, ro

    def trabeculae(self, d, base, rn, re, ro):
        """Inner edges (D, N_THETA) of the trabecular layer in the LV (<= rn) and RV (<= ro) at depths d."""
        u = ((np.asarray(d, dtype=np.float64) - base) / (self.apex - base))[:, None]
        lv = rn * (1 - self.trab_lv * np.clip((u - 0.2) / 0.3, 0, 1))          # from mid-ventricle to the apex
        band = self.band[1] * np.clip(1 - np.abs(u - self.band[0]) / 0.08, 0, 1)
        rv = ro - (ro - re) * np.maximum(self.trab_rv * np.clip(u / 0.4, 0, 1), band)
        return lv, np.maximum(rv, re)

    def radii(self, pieces, s, g, srv):
        """Rn, Re and Ro' = max(Ro, Re) for LV scale s, wall-area scale g and RV scale srv."""
        ed, kin, lin, quad, ro = pieces
        rn = ed * (1 - kin * (1 - s))
        re = np.sqrt(rn ** 2 + (self.W * lin + self.W ** 2 * quad) * (1 + (g - 1) * kin))  # akinetic: no thickening
        return rn, re, np.maximum(srv * ro, re)

    def solve(self, base, lv, myo, rv):
        """(s, g, srv) whose slice-sampled LV, MYO and RV volumes are lv, myo, rv (mm^3)."""
        pieces = self.shape(self.centres, base)
        ed, kin, lin, quad, ro = pieces
        w = 0.5 * DTHETA * self.sz                  # volume of one (slice, angle) sector is w r^2
        a, b, c = ((w * ed ** 2 * f).sum() for f in ((1 - kin) ** 2, 2 * (1 - kin) * kin, kin ** 2))
        s = max((-b + np.sqrt(max(b * b - 4 * c * (a - lv), 0.0))) / (2 * c), 0.05)  # V_lv = a + b s + c s^2
        area = w * (self.W * lin + self.W ** 2 * quad)
        g = (myo - (area * (1 - kin)).sum()) / (area * kin).sum()                  # V_myo is linear in g
        re = self.radii(pieces, s, g, 0.0)[1]
        return s, g, _rv_scale(w * ro ** 2, w * re ** 2, rv)


def _cycle(phase, es, fill_end, kick, fill, dia):
    """Normalised ventricular volume over the cycle: 1 at ED (phase 0), 0 at ES.

    Knots: ejection to ES, rapid filling to `fill`, diastasis to `dia`, atrial kick back to 1;
    cosine ramps have zero slope at every knot, so the curve is smooth and periodic.
    """
    knots, values = np.array([0.0, es, fill_end, kick, 1.0]), np.array([1.0, 0.0, fill, dia, 1.0])
    i = np.clip(np.searchsorted(knots, phase, side="right") - 1, 0, 3)
    t = (phase - knots[i]) / (knots[i + 1] - knots[i])
    t = np.where(i == 0, t ** 0.8, t)  # ejection is fastest early
    return values[i] + (values[i + 1] - values[i]) * 0.5 * (1 - np.cos(np.pi * t))


def motion(rng, dx, p, heart, n_t):
    """ES frame and per-frame LV, MYO, RV volumes (mm^3) and base descent (mm) over one cycle."""
    u = rng.uniform
    es = max(1, int(round(u(0.30, 0.40) * n_t)))
    fill = u(0.4, 0.6) if dx in ("DCM", "HCM") else u(0.65, 0.8)  # impaired relaxation leans on the atrial kick
    curve = _cycle(np.arange(n_t) / n_t, es / n_t, es / n_t + u(0.12, 0.2), u(0.8, 0.88), fill, fill + u(0.05, 0.1))
    lv = (p["lvesv"] + (p["lvedv"] - p["lvesv"]) * curve) * 1000
    rv = (p["rvesv"] + (p["rvedv"] - p["rvesv"]) * curve) * 1000
    return es, lv, np.full(n_t, p["lv_mass"] / MYO_DENSITY * 1000), rv, heart.descent * (1 - curve)


def polar(d, axis_at, xs, ys, px):
    """Pixel-unit polar coordinates about the LV axis, at depths d (D,), of the pixels at xs, ys (P,) mm:
    radius (D, P), flat index of (depth, angle) into (D, N_THETA) tables (D, P), offsets (D, P)."""
    cx, cy = axis_at(d)
    ox = ((xs[None, :] - cx[:, None]) / px).astype(np.float32)   # (D, P)
    oy = ((ys[None, :] - cy[:, None]) / px).astype(np.float32)
    turn = np.round(np.arctan2(oy, ox) / DTHETA).astype(np.int64) % N_THETA
    return np.sqrt(ox ** 2 + oy ** 2), turn + N_THETA * np.arange(len(d))[:, None], ox, oy


def labels(polar, tables, px):
    """Hard labels (D, P) at the pixel centres: nested radii Rn <= Re <= Ro' give 3, 2, 1."""
    r, flat = polar[:2]
    rn, re, ro = (np.take((t / px).astype(np.float32), flat) for t in tables)
    return (r < ro).astype(np.uint8) + (r < re) + (r < rn)


def slab(top, bottom):
    """Occupancy of a thick slice from R - r (pixels) at its top and bottom faces: the pixel-wide
    edge ramp clip(0.5 + R - r, 0, 1) averaged through the slice, R varying linearly (exact)."""
    def integral(e):  # antiderivative of the ramp
        return np.square(np.clip(e, -0.5, 0.5) + 0.5) * 0.5 + np.maximum(e - 0.5, 0)
    step = bottom - top
    flat = np.abs(step) < 1e-2
    mean = (integral(bottom) - integral(top)) / np.where(flat, 1, step)
    return np.where(flat, np.clip(0.5 + 0.5 * (top + bottom), 0, 1), mean)
