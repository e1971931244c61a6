"""The built-in 4D cine cardiac MRI phantom: ACDC-layout subjects whose masks meet drawn volumes.

Axis vocabulary: a cine is (X, Y, Z, T): X, Y in-plane, Z the short-axis slice (slice 0 at the
base, the apex last), T the cardiac frame (0 = end-diastole). Masks carry the ACDC labels
0 background, 1 RV, 2 MYO, 3 LV.

The heart is built in polar coordinates about the LV long axis. At depth d below the
end-diastolic base plane and angle theta it has an endocardial radius Rn, an epicardial radius
Re and an outer RV radius Ro; the RV cavity is Re < r < Ro, a crescent on the septal side.
Every frame's radii are solved so that the volumes its mask shows (voxel counts at the slice
centres x voxel volume) meet the drawn clinical values: LV contraction and wall area in closed
form, the RV scale by bisection, then one correction by the ratio measured on the voxelised mask.
The image is bSSFP-like (bright blood, dark myocardium, bright fat) with partial volume over
the slice thickness, coil shading and Rician noise; the mask is the hard label at voxel centres.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cine import DIAGNOSES, UserError, nifti

N_THETA = 256
_THETA = 2 * np.pi * np.arange(N_THETA) / N_THETA
_DTHETA = 2 * np.pi / N_THETA
MYO_DENSITY = 1.05  # g/mL, as cine.measures


@dataclass(frozen=True)
class Vendor:
    """One scanner's acquisition style; signals are relative to blood (1.0, the brightest)."""

    myo: float
    tissue: float    # skeletal muscle and soft tissue
    liver: float
    fat: float
    lung: float
    noise: float     # std of the complex Gaussian noise, relative to blood
    shading: float   # log-amplitude of the smooth coil sensitivity field
    blur: float      # in-plane Gaussian blur std in pixels (k-space apodisation), 0 for none
    pixel: tuple     # in-plane pixel size range (mm)
    gain: float      # stored value of blood


VENDORS = {
    "A": Vendor(0.30, 0.32, 0.40, 0.85, 0.05, 0.020, 0.25, 0.0, (1.35, 1.60), 800.0),  # 1.5 T reference: balanced contrast
    "B": Vendor(0.40, 0.38, 0.45, 0.75, 0.07, 0.040, 0.45, 0.0, (1.30, 1.45), 900.0),  # low blood-myo contrast, noisy, fine pixels, strong coil falloff
    "C": Vendor(0.24, 0.28, 0.35, 0.70, 0.04, 0.025, 0.15, 0.7, (1.60, 1.80), 700.0),  # high contrast, coarse pixels, apodised (slightly blurred)
    "D": Vendor(0.33, 0.35, 0.42, 1.05, 0.06, 0.015, 0.60, 0.0, (1.40, 1.70), 850.0),  # 3 T-like: high SNR, fat brighter than blood, strong shading
}

# Per ACDC group: LVEDV (mL), LVEF (%), LV mass / LVEDV (g/mL), LV length / radius.
_GROUPS = {
    "NOR": dict(lvedv=(100, 180), lvef=(55, 75), mass=(0.75, 1.0), sph=(2.6, 3.2)),
    "DCM": dict(lvedv=(200, 350), lvef=(15, 40), mass=(0.5, 0.7), sph=(1.9, 2.4)),
    "HCM": dict(lvedv=(80, 150), lvef=(60, 80), mass=(1.6, 2.4), sph=(2.5, 3.0)),
    "MINF": dict(lvedv=(130, 220), lvef=(30, 50), mass=(0.7, 1.0), sph=(2.3, 2.9)),
    "RV": dict(lvedv=(100, 170), lvef=(55, 70), mass=(0.75, 1.0), sph=(2.6, 3.2)),
}


@dataclass
class PhantomCase:
    """One simulated subject: cine, full-cycle mask, geometry and the drawn parameters."""

    image: np.ndarray     # (X, Y, Z, T) float32, whole numbers in about 0-1000
    mask: np.ndarray      # (X, Y, Z, T) uint8 labels
    spacing: tuple        # (sx, sy, sz) mm
    frame_ms: float
    ed: int               # 0-based, always 0
    es: int               # 0-based
    dx: str
    vendor: str
    affine: np.ndarray    # (4, 4) voxel -> world (mm)
    params: dict = field(default_factory=dict)


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


def _window(centre, half, soft=0.35):
    """Angular plateau on _THETA: 1 within `half` radians of centre, ramping to 0 over `soft`."""
    delta = np.abs(np.angle(np.exp(1j * (_THETA - centre))))
    return np.clip((half + soft / 2 - delta) / soft, 0, 1)


def _bisect(f, target, lo, hi, iters=30):
    """x in [lo, hi] with f(x) = target, for increasing f."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


class _Heart:
    """Static shape of one heart (functions of angle on _THETA, lengths in mm) and its slice stack."""

    def __init__(self, rng, dx, p, slices):
        g = _GROUPS[dx]
        u = rng.uniform
        self.u0 = u(0.12, 0.25)                    # widest cross-section, as a fraction of the length
        self.rv_dir = np.pi + 0.5 + u(-0.35, 0.35)  # septum -> RV direction
        self.ell = 1 + u(0, 0.08) * np.cos(2 * (_THETA - u(0, np.pi)))
        wall = 1 + 0.08 * np.cos(_THETA - u(0, 2 * np.pi))
        self.infarct = np.zeros(N_THETA)
        if dx == "HCM":   # asymmetric septal hypertrophy
            wall = wall + u(0.5, 0.9) * _window(self.rv_dir, u(0.5, 0.8))
        if dx == "MINF":  # a transmural scar: thinner and akinetic from u_scar to the apex
            self.infarct = _window(self.rv_dir + np.pi + u(-1.5, 1.5), u(0.5, 0.8))
            wall = wall * (1 - 0.4 * self.infarct)
        self.u_scar = u(0.15, 0.45)
        self.wall = wall
        self.cap = u(6, 9) * (1.3 if dx == "HCM" else 1.0)           # apical wall (mm)
        iu = 1 - ((1 - self.u0) ** 3 + self.u0 ** 3) / (3 * (1 - self.u0) ** 2)  # mean p(u)^2
        sph = u(*g["sph"])
        radius = (p["lvedv"] * 1000 / (np.pi * sph * iu)) ** (1 / 3)
        self.apex = radius * sph                    # cavity apex depth at ED
        self.rv_len = u(0.75, 0.9)                  # RV length / LV cavity length
        self.descent = u(8, 14) * min(1.0, p["lvef"] / 60)          # base descent at ES (mm)
        self.rv_wall, self.fat = u(2.5, 4), np.clip(u(0.5, 2) + u(0.5, 1.5, 3) @ np.cos(
            np.outer(np.arange(1, 4), _THETA) - u(0, 2 * np.pi, (3, 1))), 0, 6)
        # Slice stack: slice 0 centred just below the base, thickness from length and count.
        depth = self.apex + self.cap
        z = slices
        if depth / (z - 0.4) > 10:
            z = min(12, int(np.ceil(depth / 10 + 0.4)))
        self.sz = float(np.clip(depth / (z - 0.4), 5, 10))
        self.centres = (np.arange(z) + 0.3) * self.sz
        # ED scales: the LV radius in closed form (volume ~ R^2), the wall by bisection on the mass.
        self.R, self.W, self.r0 = radius, 1.0, np.zeros(N_THETA)
        self.R *= np.sqrt(p["lvedv"] * 1000 / self.volumes(0.0, 1.0, 1.0, 0.0)[0])

        def myo(w):
            self.W = w
            return self.volumes(0.0, 1.0, 1.0, 0.0)[1]
        self.W = _bisect(myo, p["lv_mass"] / MYO_DENSITY * 1000, 0.5, 40)
        # RV outer wall: far intersection of each ray from the LV axis with an ellipse centred
        # `dist` towards the RV (the LV axis lies inside it, so there is exactly one).
        re_mid = self.R + self.W
        dist, along, across = u(0.3, 0.5) * re_mid, u(0.85, 1.1) * re_mid, u(1.25, 1.5) * re_mid
        c, s = np.cos(_THETA - self.rv_dir), np.sin(_THETA - self.rv_dir)
        qa, qb, qc = c ** 2 / along ** 2 + s ** 2 / across ** 2, -2 * dist * c / along ** 2, dist ** 2 / along ** 2 - 1
        self.r0 = (-qb + np.sqrt(qb ** 2 - 4 * qa * qc)) / (2 * qa)

    def shape(self, d, base):
        """Scale-free pieces at depths d (D,) for base plane `base`, each (D, N_THETA):
        ED endocardium at the same relative depth, kinetic weight (0 akinetic), wall area term
        (Re^2 - Rn^2 at unit scale), RV outer radius at unit scale."""
        d = np.asarray(d, dtype=np.float64)[:, None]
        length = self.apex - base
        u = (d - base) / length
        inside = (u >= 0) & (u <= 1)
        ed = self.R * self.ell * np.sqrt(np.clip(1 - ((u - self.u0) / (1 - self.u0)) ** 2, 0, 1)) * inside
        kin = 1 - 0.95 * self.infarct * np.clip((u - self.u_scar) / 0.15, 0, 1)
        w = self.W * self.wall * (1 - 0.25 * np.clip(u, 0, 1))
        cap = np.clip(1 - ((d - self.apex) / self.cap) ** 2, 0, 1) * (d > self.apex)
        area = ((ed + w) ** 2 - ed ** 2) * inside + (0.75 * self.W * self.wall) ** 2 * cap
        ro = self.r0 * np.sqrt(np.clip(1 - ((d - base) / (self.rv_len * length)) ** 2, 0, 1)) * (d >= base)
        return ed, kin, area, ro

    @staticmethod
    def radii(pieces, s, g, srv):
        """Rn, Re and Ro' = max(Ro, Re) for LV scale s, wall scale g and RV scale srv."""
        ed, kin, area, ro = pieces
        rn = ed * (1 - kin * (1 - s))
        re = np.sqrt(rn ** 2 + area * (1 + (g - 1) * kin))  # the akinetic segment does not thicken
        return rn, re, np.maximum(srv * ro, re)

    def volumes(self, base, s, g, srv):
        """LV, MYO, RV volumes (mm^3) the mask will show: areas at the slice centres x thickness."""
        rn, re, ro = self.radii(self.shape(self.centres, base), s, g, srv)
        w = 0.5 * _DTHETA * self.sz
        return w * (rn ** 2).sum(), w * (re ** 2 - rn ** 2).sum(), w * (ro ** 2 - re ** 2).sum()

    def solve(self, base, lv, myo, rv):
        """(s, g, srv) meeting LV, MYO and RV volumes (mm^3) with the base plane at `base`."""
        ed, kin, area, ro = self.shape(self.centres, base)
        w = 0.5 * _DTHETA * self.sz * ed ** 2
        a, b, c = (w * (1 - kin) ** 2).sum(), (w * 2 * (1 - kin) * kin).sum(), (w * kin ** 2).sum()
        s = max((-b + np.sqrt(max(b * b - 4 * c * (a - lv), 0.0))) / (2 * c), 0.05)  # V(s) is quadratic
        w = 0.5 * _DTHETA * self.sz * area
        g = (myo - (w * (1 - kin)).sum()) / (w * kin).sum()                         # V(g) is linear
        srv = _bisect(lambda x: self.volumes(base, s, g, x)[2], rv, 0.1, 4.0)
        return s, g, srv


def _draw(rng, dx):
    """Clinical targets for one subject of group dx: volumes (mL), mass (g), EF (%), body size."""
    g, u = _GROUPS[dx], rng.uniform
    lvedv, lvef = u(*g["lvedv"]), u(*g["lvef"])
    if dx == "RV":
        rvedv, rvef = u(170, 300), u(20, 40)
    else:
        rvedv, rvef = lvedv * u(0.9, 1.2), u(45, 65)
        rvedv = min(rvedv, u(140, 240)) if dx == "DCM" else rvedv  # a dilated LV, not a dilated RV
    height = float(np.clip(rng.normal(172, 9), 150, 198))
    return dict(lvedv=lvedv, lvesv=lvedv * (1 - lvef / 100), rvedv=rvedv, rvesv=rvedv * (1 - rvef / 100),
                lv_mass=lvedv * u(*g["mass"]), lvef=lvef, rvef=rvef,
                height=round(height, 1), weight=round(u(19, 32) * (height / 100) ** 2, 1))


def _smooth(rng, shape, cells):
    """Smooth random field of shape (X, Y, Z): unit noise on a coarse in-plane grid, linearly upsampled."""
    coarse = rng.standard_normal((cells + 1, cells + 1, shape[2]))
    hat = [np.clip(1 - np.abs(np.linspace(0, cells, n)[:, None] - np.arange(cells + 1)), 0, 1) for n in shape[:2]]
    return np.einsum("xa,yb,abz->xyz", hat[0], hat[1], coarse)  # (X, Y, Z)


def _background(rng, v, x, y, c0, heart, reach):
    """Static tissue around the heart, (X, Y, Z): chest wall, fat, lungs, liver, spine, aorta.

    Laid out in a frame that turns with the heart (RV towards upper left, posterior down),
    in mm from the LV axis; `reach` is the heart's extent from that axis towards the RV.
    """
    turn = heart.rv_dir - (np.pi + 0.5)
    dx, dy = x[:, None] - c0[0], y[None, :] - c0[1]
    xc, yc = np.cos(turn) * dx + np.sin(turn) * dy, -np.sin(turn) * dx + np.cos(turn) * dy
    px = x[1] - x[0]

    def ellipse(cx, cy, a, b):
        rho = np.sqrt(((xc - cx) / a) ** 2 + ((yc - cy) / b) ** 2)
        return np.clip(0.5 + (1 - rho) * min(a, b) / px, 0, 1)

    u, re = rng.uniform, heart.R + heart.W
    mix = 0.5 * (v.fat + v.tissue)
    a, b, subcut = u(150, 185), u(105, 125), u(8, 20)
    img = np.zeros_like(xc)
    for layer, value in ((ellipse(-10, 40, a, b), v.fat), (ellipse(-10, 40, a - subcut, b - subcut), v.tissue),
                         (ellipse(-10, 45, a - subcut - 12, b - subcut - 12), v.lung),
                         (ellipse(0, re + 55, 38, 30), v.tissue), (ellipse(0, re + 50, 17, 15), mix),
                         (ellipse(0, re + 77, 7, 7), 0.9), (ellipse(28, re + 28, 12, 12), 1.0)):
        img += (value - img) * layer
    mid = (reach - re) / 2  # the mediastinum hugs the heart, keeping the lungs off it
    mediastinum = ellipse(-0.88 * mid, -0.48 * mid, (reach + re) / 2 + 10, 0.8 * (reach + re) / 2 + 10)
    out = np.empty(x.shape + y.shape + heart.centres.shape, dtype=np.float32)
    for k, d in enumerate(heart.centres):  # the liver rises into the apical slices
        grow = np.clip(1.4 * d / (heart.apex + heart.cap) - 0.3, 0.01, 1)
        sl = img + (v.liver - img) * ellipse(-45, 80 + re, 95 * grow, 70 * grow)
        out[..., k] = sl + (mix - sl) * mediastinum
    return out * (1 + 0.05 * _smooth(rng, out.shape, 6)).astype(np.float32)


def _shading(rng, v, x, y, c0):
    """Smooth coil sensitivity (X, Y): a gradient plus a surface-coil hot spot, 1 at the heart."""
    fov = x[-1] - x[0]
    angle, gx, gy = rng.uniform(0, 2 * np.pi), *rng.normal(0, 0.5, 2)
    cx, cy = 0.45 * fov * np.cos(angle), 0.45 * fov * np.sin(angle)

    def field(px, py):
        bump = np.exp(-((px - cx) ** 2 + (py - cy) ** 2) / (2 * (0.35 * fov) ** 2))
        return np.exp(v.shading * (gx * px / fov + gy * py / fov + bump))
    return (field(x[:, None], y[None, :]) / field(*c0)).astype(np.float32)


def _blur(a, sigma):
    """In-place 3-tap Gaussian blur along X and Y of an (X, Y, ...) array (edges replicated)."""
    w = np.exp(-0.5 / sigma ** 2)
    w = w / (1 + 2 * w)
    for axis in (0, 1):
        b = np.swapaxes(a, 0, axis)
        lo, hi = b[:-1].copy(), b[1:].copy()
        b *= 1 - 2 * w
        b[1:] += w * lo
        b[:-1] += w * hi
        b[0] += w * lo[0]
        b[-1] += w * hi[-1]
    return a


def _polar(d, axis_at, xs, ys):
    """Polar coordinates about the LV axis of the box pixels at depths d (D,): radius (mm) and the
    flat index of (row, angle) into (D, N_THETA) tables, each (D, BX, BY); offsets (D, BX, 1), (D, 1, BY)."""
    cx, cy = axis_at(d)
    ox = (xs[None, :, None] - cx[:, None, None]).astype(np.float32)   # (D, BX, 1)
    oy = (ys[None, None, :] - cy[:, None, None]).astype(np.float32)   # (D, 1, BY)
    turn = np.round(np.arctan2(oy, ox) * (N_THETA / (2 * np.pi))).astype(np.int64) % N_THETA
    return np.sqrt(ox ** 2 + oy ** 2), turn + N_THETA * np.arange(len(d))[:, None, None], ox, oy


def _labels(polar, tables):
    """Hard labels (D, BX, BY) at the pixel centres: nested radii Rn <= Re <= Ro' give 3, 2, 1."""
    r, flat = polar[:2]
    rn, re, ro = (np.take(t, flat) for t in tables)
    return (r < ro).astype(np.uint8) + (r < re) + (r < rn)


def _render(heart, v, d, base, state, polar, bg, px):
    """Noise-free heart over the background at the sub-slice depths d (2Z,), averaged per slice -> (Z, BX, BY)."""
    r, flat, ox, oy = polar
    rn, re, ro = heart.radii(heart.shape(d, base), *state)
    atrium = d < base  # above the valve plane: atrial blood and a thin wall, unlabelled
    if atrium.any():
        rn[atrium] = 0.9 * heart.R * heart.ell * np.sqrt(1 - (heart.u0 / (1 - heart.u0)) ** 2)
        re[atrium] = rn[atrium] + 2
        ro[atrium] = np.maximum(0.9 * state[2] * heart.r0, re[atrium])
    rw = ro + heart.rv_wall * np.clip((ro - re) / 3, 0, 1)  # RV free wall: myocardial signal, not MYO
    rf = rw + heart.fat * np.clip(rw / 5, 0, 1)             # epicardial fat
    o_n, o_e, o_o, o_w, o_f = (np.clip(0.5 + (np.take(t, flat) - r) / px, 0, 1) for t in (rn, re, ro, rw, rf))
    # Papillary muscles: dark disks inside the cavity (labelled LV, as in ACDC).
    u = (d - base) / (heart.apex - base)
    size = (0.11 * heart.R * np.clip(np.minimum(u - 0.25, 0.8 - u) / 0.1, 0, 1)).astype(np.float32)[:, None, None]
    pap = 0.0
    for angle in heart.rv_dir + np.pi + np.array([-0.75, 0.75]):
        pos = 0.6 * rn[:, int(round(angle / _DTHETA)) % N_THETA].astype(np.float32)[:, None, None]
        dist = np.sqrt((ox - pos * np.cos(angle)) ** 2 + (oy - pos * np.sin(angle)) ** 2)
        pap = np.maximum(pap, np.clip(0.5 + (size - dist) / px, 0, 1))
    img = bg + (v.fat - bg) * o_f + (v.myo - v.fat) * o_w + (1 - v.myo) * (o_o - o_e + o_n * (1 - pap))
    return img.reshape(-1, 2, *img.shape[1:]).mean(1)  # (Z, 2, BX, BY) -> (Z, BX, BY)


def _affine(rng, spacing, shape):
    """Oblique voxel -> world (mm): an oblique slice normal, a random turn about it, the volume near isocentre."""
    def rot(axis, a):
        m = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
        return m
    r = rot(0, rng.uniform(-0.6, 0.6)) @ rot(1, rng.uniform(-0.6, 0.6)) @ rot(2, rng.uniform(0, 2 * np.pi))
    affine = np.eye(4)
    affine[:3, :3] = r * np.asarray(spacing)[None, :]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[:3]) - 1) / 2) + rng.uniform(-20, 20, 3)
    return affine


def _check(dx, vendor):
    if dx not in _GROUPS:
        raise UserError(f"unknown diagnosis {dx!r} (expected one of {', '.join(DIAGNOSES)} or mixed)")
    if vendor not in VENDORS:
        raise UserError(f"unknown vendor {vendor!r} (expected one of {', '.join(VENDORS)} or mixed)")


def simulate(rng, dx, vendor, frames=None, matrix=None) -> PhantomCase:
    """One subject of diagnosis dx in vendor's style; frames / matrix override the drawn T / X."""
    _check(dx, vendor)
    if (frames is not None and frames < 4) or (matrix is not None and matrix < 32):
        raise UserError("the phantom needs at least 4 frames and a 32-voxel matrix")
    v, u = VENDORS[vendor], rng.uniform
    p = _draw(rng, dx)
    n_t, heart_rate = int(frames or rng.integers(20, 36)), u(50, 95)
    heart = _Heart(rng, dx, p, int(rng.integers(8, 13)))
    es = max(1, int(round(u(0.30, 0.40) * n_t)))
    fill = u(0.4, 0.6) if dx in ("DCM", "HCM") else u(0.65, 0.8)  # impaired relaxation leans on the atrial kick
    curve = _cycle(np.arange(n_t) / n_t, es / n_t, es / n_t + u(0.12, 0.2), u(0.8, 0.88), fill, fill + u(0.05, 0.1))
    lv = (p["lvesv"] + (p["lvedv"] - p["lvesv"]) * curve) * 1000     # mm^3 per frame
    rv = (p["rvesv"] + (p["rvedv"] - p["rvesv"]) * curve) * 1000
    myo = p["lv_mass"] / MYO_DENSITY * 1000
    bases = heart.descent * (1 - curve)
    states = [heart.solve(b, lv[t], myo, rv[t]) for t, b in enumerate(bases)]

    # In-plane grid (mm from the image centre), heart placed near the centre with a tilted axis.
    fov, px = u(200, 260), u(*v.pixel)
    n_x = int(matrix) if matrix else int(np.clip(round(fov / px), 128, 176))
    px = fov / n_x if matrix else px
    n_y = int(round(n_x * u(0.8, 0.95)))
    x, y = (np.arange(n_x) - (n_x - 1) / 2) * px, (np.arange(n_y) - (n_y - 1) / 2) * px
    ed_tables = heart.radii(heart.shape(heart.centres, 0.0), *states[0])
    reach, re_max = max(s[2] for s in states) * heart.r0.max(), float(ed_tables[1].max())
    toward_rv = np.array([np.cos(heart.rv_dir), np.sin(heart.rv_dir)])
    c0 = -0.5 * (reach - re_max) * toward_rv + u(-0.06, 0.06, 2) * np.array([n_x, n_y]) * px
    tilt, mid = u(0, 0.12) * np.array([np.cos(a := u(0, 2 * np.pi)), np.sin(a)]), heart.centres.mean()

    def axis_at(d):
        return c0[0] + tilt[0] * (d - mid), c0[1] + tilt[1] * (d - mid)
    ext = 1.05 * max(reach, re_max) + heart.rv_wall + 6 + 2 * px + np.hypot(*tilt) * (mid + heart.sz)
    box = [np.flatnonzero(np.abs(g - c) <= ext) for g, c in ((x, c0[0]), (y, c0[1]))]
    (x0, x1), (y0, y1) = ((b[0], b[-1] + 1) for b in box)

    bg = _background(rng, v, x, y, c0, heart, reach)
    image = np.repeat(bg[..., None], n_t, axis=3)                           # (X, Y, Z, T)
    mask = np.zeros(image.shape, dtype=np.uint8)
    soft_d = (heart.centres[:, None] + np.array([-0.25, 0.25]) * heart.sz).ravel()  # (2Z,) sub-slice depths
    soft = _polar(soft_d, axis_at, x[x0:x1], y[y0:y1])
    centre = _polar(heart.centres, axis_at, x[x0:x1], y[y0:y1])
    bg_rows = np.repeat(bg[x0:x1, y0:y1].transpose(2, 0, 1), 2, axis=0)    # (2Z, BX, BY)
    voxel = px * px * heart.sz
    for t, base in enumerate(bases):
        # Pixel sampling shifts the counts a little: correct the targets once by measured / analytic.
        counts = np.bincount(_labels(centre, heart.radii(heart.shape(heart.centres, base), *states[t])).ravel(),
                             minlength=4) * voxel
        state = heart.solve(base, *(a * a / max(m, voxel) for a, m in zip((lv[t], myo, rv[t]), counts[[3, 2, 1]])))
        mask[x0:x1, y0:y1, :, t] = _labels(centre, heart.radii(heart.shape(heart.centres, base), *state)).transpose(1, 2, 0)
        image[x0:x1, y0:y1, :, t] = _render(heart, v, soft_d, base, state, soft, bg_rows, px).transpose(1, 2, 0)

    # Acquisition: coil shading, k-space apodisation, Rician noise (magnitude of complex Gaussian).
    image *= _shading(rng, v, x, y, c0)[..., None, None]
    noise = [rng.standard_normal(image.shape, dtype=np.float32) * np.float32(v.noise) for _ in range(2)]
    if v.blur:
        for a in (image, *noise):
            _blur(a, v.blur)
    image += noise[0]
    image = np.round(np.sqrt(image * image + noise[1] * noise[1]) * v.gain)

    rn, re = ed_tables[:2]
    rows = (heart.centres > 0.2 * heart.apex) & (heart.centres < 0.8 * heart.apex)
    wall = (re - rn)[rows]
    p.update(es=es, frames=n_t, heart_rate=heart_rate, rr_ms=60000 / heart_rate, slices=len(heart.centres),
             slice_mm=heart.sz, pixel_mm=px, wall_mm=float(wall.mean()), wall_max_mm=float(wall.max()))
    spacing = (px, px, heart.sz)
    return PhantomCase(image.astype(np.float32), mask, spacing, 60000 / heart_rate / n_t, 0, es, dx, vendor,
                       _affine(rng, spacing, image.shape), {k: float(val) for k, val in p.items()})


def _files(sid, es):
    """Every file of one written subject (es 0-based)."""
    return ["Info.cfg", "params.json", f"{sid}_4d.nii.gz", f"{sid}_4d_gt.nii.gz",
            *(f"{sid}_frame{t:02d}{gt}.nii.gz" for t in (1, es + 1) for gt in ("", "_gt"))]


def _complete(folder):
    try:
        cfg = dict(line.split(":", 1) for line in (folder / "Info.cfg").read_text().splitlines() if ":" in line)
        es = int(cfg["ES"]) - 1
    except (OSError, KeyError, ValueError):
        return False
    return all((folder / name).is_file() for name in _files(folder.name, es))


def _write_subject(folder, case, seed):
    """Write into a hidden temp folder, then rename it into place: never a half-written subject."""
    sid = folder.name
    tmp, old = folder.with_name(f".{sid}.tmp"), folder.with_name(f".{sid}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        cine, frame = nifti.Geometry(case.affine, case.spacing, case.frame_ms), nifti.Geometry(case.affine, case.spacing, None)
        image = case.image.astype(np.int16)
        nifti.write(tmp / f"{sid}_4d.nii.gz", image, cine)
        nifti.write(tmp / f"{sid}_4d_gt.nii.gz", case.mask, cine, kind="mask")
        for t in (case.ed, case.es):
            nifti.write(tmp / f"{sid}_frame{t + 1:02d}.nii.gz", image[..., t], frame)
            nifti.write(tmp / f"{sid}_frame{t + 1:02d}_gt.nii.gz", case.mask[..., t], frame, kind="mask")
        p = case.params
        (tmp / "Info.cfg").write_text(f"ED: {case.ed + 1}\nES: {case.es + 1}\nGroup: {case.dx}\nHeight: {p['height']:.1f}\n"
                                      f"NbFrame: {image.shape[3]}\nWeight: {p['weight']:.1f}\nVendor: {case.vendor}\nSeed: {seed}\n")
        (tmp / "params.json").write_text(json.dumps({"dx": case.dx, "vendor": case.vendor, "seed": seed, **p}, indent=1))
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_phantom(out, n, seed, dx="mixed", vendor="mixed", overwrite=False, progress=True, frames=None, matrix=None):
    """Write n phantom subjects to out in ACDC layout; yields each subject's folder once it is complete.

    Subject i (patient{i+1:03d}) draws from its own generator seeded with (seed, i), so it is
    the same alone or in any batch. "mixed" cycles diagnoses (5) and vendors (4) together,
    so every pairing occurs once in 20 subjects. A complete existing subject is kept unless
    overwrite; an incomplete one is rewritten.
    """
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    names = sorted(VENDORS)
    _check(DIAGNOSES[0] if dx == "mixed" else dx, names[0] if vendor == "mixed" else vendor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc="phantom", unit="subject", file=sys.stderr, disable=not progress):
        folder = out / f"patient{i + 1:03d}"
        if overwrite or not _complete(folder):
            case = simulate(np.random.default_rng([seed, i]), DIAGNOSES[i % 5] if dx == "mixed" else dx,
                            names[i % 4] if vendor == "mixed" else vendor, frames=frames, matrix=matrix)
            _write_subject(folder, case, seed)
        yield folder
