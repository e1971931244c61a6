"""The built-in 4D cine cardiac MRI phantom: ACDC-layout subjects whose masks meet drawn volumes.

Axis vocabulary: a cine is (X, Y, Z, T): X, Y in-plane, Z the short-axis slice (slice 0 at the
base, the apex last), T the cardiac frame (0 = end-diastole). Masks carry the ACDC labels
0 background, 1 RV, 2 MYO, 3 LV.

The heart's shape, motion and voxelisation live in cine.heart; this module places the heart in
a chest, renders and acquires it, and writes subjects. The image is bSSFP-like (bright blood,
dark myocardium, bright fat) with partial volume over the slice thickness, coil shading and
Rician noise; the mask is the hard label at voxel centres.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth4d.cine import DIAGNOSES, UserError, atomic_folder, nifti
from synth4d.cine.heart import DTHETA, GROUPS, N_THETA, Heart, draw_parameters, labels, motion, polar, slab


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


# Gains keep most stored values below 256: gzip then finds the int16 high bytes empty (files ~40 % smaller).
VENDORS = {  # myo, tissue, liver, fat, lung, noise, shading, blur, pixel (mm), gain
    # A: 1.5 T reference, balanced contrast and noise
    "A": Vendor(0.30, 0.32, 0.40, 0.85, 0.05, 0.020, 0.25, 0.0, (1.35, 1.60), 240.0),
    # B: low blood-myocardium contrast, noisy, fine pixels, strong coil falloff
    "B": Vendor(0.40, 0.38, 0.45, 0.75, 0.07, 0.040, 0.45, 0.0, (1.30, 1.45), 250.0),
    # C: high contrast, coarse pixels, k-space apodisation (slightly blurred)
    "C": Vendor(0.24, 0.28, 0.35, 0.70, 0.04, 0.025, 0.15, 0.7, (1.60, 1.80), 220.0),
    # D: 3 T-like: high SNR, fat brighter than blood, strong shading
    "D": Vendor(0.33, 0.35, 0.42, 1.05, 0.06, 0.015, 0.60, 0.0, (1.40, 1.70), 200.0),
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


def _smooth(rng, shape, cells):
    """Smooth random field of shape (X, Y, Z): unit noise on a coarse in-plane grid, linearly upsampled."""
    coarse = rng.standard_normal((cells + 1, cells + 1, shape[2]))
    hat = [np.clip(1 - np.abs(np.linspace(0, cells, n)[:, None] - np.arange(cells + 1)), 0, 1) for n in shape[:2]]
    return np.einsum("xa,yb,abz->xyz", hat[0], hat[1], coarse, optimize=True)  # (X, Y, Z)


def _background(rng, v, x, y, c0, heart, reach):
    """Static tissue around the heart, (X, Y, Z): chest wall, fat, lungs, liver, spine, aorta.

    Laid out in a frame that turns with the heart (RV towards the upper left, posterior down),
    in mm from the LV axis; `reach` is the heart's extent from that axis towards the RV.
    """
    turn = heart.rv_dir - (np.pi + 0.5)
    ox, oy = x[:, None] - c0[0], y[None, :] - c0[1]
    xc, yc = np.cos(turn) * ox + np.sin(turn) * oy, -np.sin(turn) * ox + np.cos(turn) * oy
    px = x[1] - x[0]

    def ellipse(cx, cy, a, b):  # soft occupancy, edges about a pixel wide
        return np.clip(0.5 + (1 - np.sqrt(((xc - cx) / a) ** 2 + ((yc - cy) / b) ** 2)) * min(a, b) / px, 0, 1)

    u, re = rng.uniform, heart.R + heart.W
    mix = 0.5 * (v.fat + v.tissue)    # mediastinal fat and connective tissue
    a, b, subcut = u(150, 185), u(105, 125), u(8, 20)
    thorax = ellipse(-10, 40, a - subcut - 12, b - subcut - 12)
    img = np.zeros_like(xc)
    for layer, value in ((ellipse(-10, 35, a, b), v.fat), (ellipse(-10, 35, a - subcut, b - subcut), v.tissue),
                         (thorax, mix), (thorax * ellipse(re + u(35, 50), 5, 48, 85), v.lung),
                         (thorax * ellipse(-reach - u(30, 45), 15, 50, 90), v.lung),
                         (ellipse(0, re + 62, 45, 28), v.tissue), (ellipse(0, re + 52, 17, 15), mix),
                         (ellipse(0, re + 78, 7, 7), 0.9), (ellipse(30, re + 26, 12, 12), 1.0)):
        img += (value - img) * layer
    out = np.empty(x.shape + y.shape + heart.centres.shape, dtype=np.float32)
    for k, depth in enumerate(heart.centres / (heart.apex + heart.cap)):
        grow = np.clip(1.4 * depth - 0.3, 0.01, 1)  # the liver rises into the apical slices
        sl = img + (v.liver - img) * ellipse(-55, re + 70, 100 * grow, 75 * grow)
        half = (reach + re) / 2 * np.sqrt(np.clip(1.1 - depth ** 2, 0.15, 1))  # the mediastinum hugs the heart
        around = ellipse(-0.88 * (reach - re) / 2, -0.48 * (reach - re) / 2, half + 5, 0.8 * half + 5)
        out[..., k] = sl + (mix - sl) * around
    return out * (1 + 0.06 * _smooth(rng, out.shape, 8)).astype(np.float32)


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
    """3-tap Gaussian blur along X and Y of an (X, Y, ...) array, edges replicated."""
    w = np.exp(-0.5 / sigma ** 2)
    w = np.float32(w / (1 + 2 * w))
    for axis in (0, 1):
        a = np.moveaxis(a, axis, 0)
        out = a * (1 - 2 * w)
        out[1:] += w * a[:-1]
        out[:-1] += w * a[1:]
        out[0] += w * a[0]
        out[-1] += w * a[-1]
        a = np.moveaxis(out, 0, axis)
    return a


TRABECULAR_BLOOD = 0.2   # blood fraction of the trabecular layer within a finger


def _render(heart, v, faces, base, state, polar, centre, bg, px):
    """Noise-free slices (Z, P): the heart, from its radii at the slices' faces (2Z,), over the background."""
    r, flat = polar[:2]
    rn, re, ro = heart.radii(heart.shape(faces, base), *state)
    atrium = faces < base  # above the valve plane: atrial blood and a thin wall, unlabelled
    if atrium.any():
        rn[atrium] = 0.9 * heart.R * heart.ell * np.sqrt(1 - (heart.u0 / (1 - heart.u0)) ** 2)
        re[atrium] = rn[atrium] + 2
        ro[atrium] = np.maximum(0.9 * state[2] * heart.r0, re[atrium])
    rw = ro + heart.rv_wall * np.clip((ro - re) / 3, 0, 1)  # RV free wall: myocardial signal, not MYO
    rf = rw + heart.fat * np.clip(rw / 5, 0, 1)             # epicardial fat
    tn, to = heart.trabeculae(faces, base, rn, re, ro)
    tn[atrium], to[atrium] = rn[atrium], ro[atrium]

    def occupancy(table):
        e = np.take((table / px).astype(np.float32), flat) - r   # (2Z, P): R - r on both faces
        return slab(e[0::2], e[1::2])
    o_n, o_e, o_o, o_w, o_f, o_tn, o_to = map(occupancy, (rn, re, ro, rw, rf, tn, to))
    # Papillary muscles: dark disks in the cavity at mid-ventricular levels (labelled LV, as in ACDC).
    d = 0.5 * (faces[0::2] + faces[1::2])
    u = (d - base) / (heart.apex - base)
    size = 0.11 * heart.R / px * np.clip(np.minimum(u - 0.25, 0.8 - u) / 0.1, 0, 1)
    rows, (_, _, ox, oy) = np.flatnonzero(size > 0), centre
    if rows.size:
        rn_mid = heart.radii(heart.shape(d[rows], base), *state)[0]
        pap = 0.0
        for angle in heart.rv_dir + np.pi + np.array([-0.75, 0.75]):
            pos = (0.6 / px * rn_mid[:, int(round(angle / DTHETA)) % N_THETA]).astype(np.float32)[:, None]
            dist = np.sqrt((ox[rows] - pos * np.cos(angle)) ** 2 + (oy[rows] - pos * np.sin(angle)) ** 2)
            pap = np.maximum(pap, np.clip(size[rows, None].astype(np.float32) + 0.5 - dist, 0, 1))
    # Blood signal: the cavities, the trabecular layers between their edges holding a fifth of blood.
    lv_blood = o_tn + TRABECULAR_BLOOD * (o_n - o_tn)
    if rows.size:
        lv_blood[rows] *= 1 - pap
    img = o_to - o_e + TRABECULAR_BLOOD * (o_o - o_to)
    img += lv_blood
    img *= 1 - v.myo
    img += (v.myo - v.fat) * o_w
    img += v.fat * o_f
    img += bg * (1 - o_f)
    return img


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
    if dx not in GROUPS:
        raise UserError(f"unknown diagnosis {dx!r} (expected one of {', '.join(DIAGNOSES)} or mixed)")
    if vendor not in VENDORS:
        raise UserError(f"unknown vendor {vendor!r} (expected one of {', '.join(VENDORS)} or mixed)")


def _acquire(rng, v, image, shading):
    """Coil shading, Rician noise (magnitude of complex Gaussian), apodisation; stored values, rounded."""
    image *= shading[..., None, None]
    # Real and imaginary noise are two windows of one buffer, far apart: independent per voxel, half the draws.
    shift = int(rng.integers(10_000, 20_000))
    draws = rng.standard_normal(image.size + shift, dtype=np.float32)
    draws *= np.float32(v.noise)
    image += draws[:image.size].reshape(image.shape)
    image *= image
    imag = draws[shift:].reshape(image.shape)
    image += imag * imag
    np.sqrt(image, out=image)
    if v.blur:  # on the magnitude: one pass instead of three, and indistinguishable
        image = _blur(image, v.blur)
    image *= np.float32(v.gain)
    return np.rint(image, out=image)


def simulate(rng, dx, vendor, frames=None, matrix=None) -> PhantomCase:
    """One subject of diagnosis dx in vendor's style; frames / matrix override the drawn T / X."""
    _check(dx, vendor)
    if (frames is not None and frames < 4) or (matrix is not None and matrix < 32):
        raise UserError("the phantom needs at least 4 frames and a 32-voxel matrix")
    v, u = VENDORS[vendor], rng.uniform
    p = draw_parameters(rng, dx)
    n_t, heart_rate = int(frames or rng.integers(20, 36)), u(50, 95)
    heart = Heart(rng, dx, p, int(rng.integers(8, 13)))
    es, lv, myo, rv, bases = motion(rng, dx, p, heart, n_t)
    states = [heart.solve(*frame) for frame in zip(bases, lv, myo, rv)]

    # In-plane grid (mm from the image centre); the FOV stays when a matrix is imposed.
    # A cardiac FOV (180-230 mm read-out, 75-90 % phase): most of what is written is noise, so every
    # voxel outside the chest costs disk without teaching anything.
    fov, px = u(180, 230), u(*v.pixel)
    n_x = int(matrix) if matrix else int(np.clip(round(fov / px), 112, 160))
    px = fov / n_x if matrix else px
    n_y = int(round(n_x * u(0.75, 0.9)))
    x, y = (np.arange(n_x) - (n_x - 1) / 2) * px, (np.arange(n_y) - (n_y - 1) / 2) * px
    # The heart near the centre, its axis slightly tilted to the slice normal.
    ed_tables = heart.radii(heart.shape(heart.centres, 0.0), *states[0])
    reach, re_max = max(s[2] for s in states) * heart.r0.max(), float(ed_tables[1].max())
    c0 = -0.5 * (reach - re_max) * np.array([np.cos(heart.rv_dir), np.sin(heart.rv_dir)]) \
        + u(-0.06, 0.06, 2) * np.array([n_x, n_y]) * px
    tilt, mid = u(0, 0.12) * np.array([np.cos(a := u(0, 2 * np.pi)), np.sin(a)]), heart.centres.mean()

    def axis_at(d):
        return c0[0] + tilt[0] * (d - mid), c0[1] + tilt[1] * (d - mid)
    # The pixels the heart may cover in any frame: inside its outline about the axis, padded for the tilt.
    outline = 1.05 * np.maximum(max(s[2] for s in states) * heart.r0, re_max) + heart.rv_wall + 6 + 2 * px
    gx, gy = np.meshgrid(x - c0[0], y - c0[1], indexing="ij")                 # (X, Y)
    near = np.hypot(gx, gy) <= outline[np.round(np.arctan2(gy, gx) / DTHETA).astype(int) % N_THETA] \
        + np.hypot(*tilt) * (mid + heart.sz)
    ix, iy = np.nonzero(near)                                                  # (P,), (P,)

    bg = _background(rng, v, x, y, c0, heart, reach)
    image = np.repeat(bg[..., None], n_t, axis=3)                           # (X, Y, Z, T)
    mask = np.zeros(image.shape, dtype=np.uint8)
    faces = (heart.centres[:, None] + np.array([-0.5, 0.5]) * heart.sz).ravel()  # (2Z,) top, bottom of each slice
    soft = polar(faces, axis_at, x[ix], y[iy], px)
    centre = polar(heart.centres, axis_at, x[ix], y[iy], px)
    bg_near = bg[ix, iy].T                                                     # (Z, P)
    voxel = px * px * heart.sz
    for t, base in enumerate(bases):
        # Pixel sampling shifts the counts a little: correct the targets once by analytic / measured.
        pieces = heart.shape(heart.centres, base)
        counts = np.bincount(labels(centre, heart.radii(pieces, *states[t]), px).ravel(), minlength=4) * voxel
        targets = (lv[t], myo[t], rv[t])
        state = heart.solve(base, *(a * a / max(m, voxel) for a, m in zip(targets, counts[[3, 2, 1]])))
        mask[ix, iy, :, t] = labels(centre, heart.radii(pieces, *state), px).T
        image[ix, iy, :, t] = _render(heart, v, faces, base, state, soft, centre, bg_near, px).T
    image = _acquire(rng, v, image, _shading(rng, v, x, y, c0))

    wall = (ed_tables[1] - ed_tables[0])[heart.mid]
    p.update(es=es, frames=n_t, heart_rate=heart_rate, rr_ms=60000 / heart_rate, slices=len(heart.centres),
             slice_mm=heart.sz, pixel_mm=px, wall_mm=float(wall.mean()), wall_max_mm=float(wall.max()))
    spacing = (px, px, heart.sz)
    return PhantomCase(image, mask, spacing, 60000 / heart_rate / n_t, 0, es, dx, vendor,
                       _affine(rng, spacing, image.shape),
                       {k: val if isinstance(val, int) else float(val) for k, val in p.items()})


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
    """Write one subject's folder, whole or not at all (cine.atomic_folder)."""
    sid = folder.name

    def write(tmp):
        cycle, frame = (nifti.Geometry(case.affine, case.spacing, ms) for ms in (case.frame_ms, None))
        image = case.image.astype(np.int16)
        nifti.write(tmp / f"{sid}_4d.nii.gz", image, cycle)
        nifti.write(tmp / f"{sid}_4d_gt.nii.gz", case.mask, cycle, kind="mask")
        for t in (case.ed, case.es):
            nifti.write(tmp / f"{sid}_frame{t + 1:02d}.nii.gz", image[..., t], frame)
            nifti.write(tmp / f"{sid}_frame{t + 1:02d}_gt.nii.gz", case.mask[..., t], frame, kind="mask")
        p = case.params
        (tmp / "Info.cfg").write_text(
            f"ED: {case.ed + 1}\nES: {case.es + 1}\nGroup: {case.dx}\nHeight: {p['height']:.1f}\n"
            f"NbFrame: {image.shape[3]}\nWeight: {p['weight']:.1f}\nVendor: {case.vendor}\nSeed: {seed}\n")
        (tmp / "params.json").write_text(json.dumps({"dx": case.dx, "vendor": case.vendor, "seed": seed, **p}))

    atomic_folder(folder, write)


def write_phantom(out, n, seed, dx="mixed", vendor="mixed", overwrite=False, progress=True, frames=None,
                  matrix=None, workers=None):
    """Write n phantom subjects to out in ACDC layout; yields each subject's folder, in order, once complete.

    Subject i (patient{i+1:03d}) draws from its own generator seeded with (seed, i), so it is
    the same alone or in any batch. "mixed" cycles diagnoses (5) and vendors (4) together, so
    every pairing occurs once in 20 subjects. A complete existing subject is kept unless
    overwrite; an incomplete one is rewritten. Subjects are made on `workers` threads (numpy
    and zlib release the GIL; default: the CPU count, at most 4).
    """
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    names = sorted(VENDORS)
    _check(DIAGNOSES[0] if dx == "mixed" else dx, names[0] if vendor == "mixed" else vendor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # a rerun continues the same data set, never mixes in another one
        folder = out / f"patient{i + 1:03d}"
        want = {"seed": seed, "dx": DIAGNOSES[i % 5] if dx == "mixed" else dx,
                "vendor": names[i % 4] if vendor == "mixed" else vendor}
        if not overwrite and _complete(folder):
            try:
                have = {k: json.loads((folder / "params.json").read_text())[k] for k in want}
            except (OSError, ValueError, KeyError, TypeError):
                have = None
            if have != want:
                raise UserError(f"{folder} holds another phantom subject than --seed {seed} --dx {dx} --vendor "
                                f"{vendor} makes ({have or 'unreadable params.json'}); pass --overwrite or another OUT")

    def make(i):
        folder = out / f"patient{i + 1:03d}"
        if overwrite or not _complete(folder):
            case = simulate(np.random.default_rng([seed, i]), DIAGNOSES[i % 5] if dx == "mixed" else dx,
                            names[i % 4] if vendor == "mixed" else vendor, frames=frames, matrix=matrix)
            _write_subject(folder, case, seed)
        return folder
    pool = ThreadPoolExecutor(workers or max(1, min(n, os.cpu_count() or 1, 4)))
    try:
        yield from tqdm(pool.map(make, range(n)), total=n, desc="phantom", unit="subject", file=sys.stderr,
                        disable=not progress)
    finally:
        pool.shutdown(cancel_futures=True)
