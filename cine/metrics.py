"""Metric math in numpy: overlap and surface distance of masks, agreement of measures, Fréchet
distance of feature sets, image similarity, and temporal / topological coherence.

Axis vocabulary: a mask or volume is (X, Y, Z) (any number of axes where it says so), an image
series (X, Y, ...) is compared slice by slice over (X, Y); features are (N, D); a curve is (T,).
Spacing is per axis, in mm.
"""
from __future__ import annotations

import numpy as np

# ---- masks -------------------------------------------------------------------------------


def dice_binary(a, b) -> float:
    """Dice overlap 2|A & B| / (|A| + |B|) of two binary masks; 1.0 when both are empty (they agree)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def dice(a, b, labels=(1, 2, 3)) -> dict:
    """Dice per label of two label maps: {label: float}; a label absent from both scores 1.0."""
    a, b = np.asarray(a), np.asarray(b)
    return {label: dice_binary(a == label, b == label) for label in labels}


def surface(mask) -> np.ndarray:
    """Foreground voxels with at least one background face neighbour (outside the array counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~interior


def _nearest_distances(p, q, step: float) -> np.ndarray:
    """For each point of p (n, d), the distance to the nearest point of q (m, d); exact.

    Both are voxel positions in mm on one grid whose last axis has spacing `step`. Points are taken
    one last-axis layer of p at a time, against the layers of q in order of distance, and a layer is
    skipped once every point's nearest so far is no farther than the layer itself: at short-axis
    slice spacing almost every nearest point is in the same or the next slice. Squared in-layer
    distances are |p|^2 + |q|^2 - 2 p.q, about the layers' mean, in float64.
    """
    layer_p = np.round(p[:, -1] / step).astype(np.int64)
    layer_q = np.round(q[:, -1] / step).astype(np.int64)
    q_layers = {k: q[layer_q == k, :-1] for k in np.unique(layer_q)}
    out = np.full(len(p), np.inf)
    for k in np.unique(layer_p):
        rows = np.flatnonzero(layer_p == k)
        pk = p[rows, :-1]
        best = np.full(len(rows), np.inf)
        for dk in sorted(q_layers, key=lambda j: abs(j - k)):
            dz2 = ((dk - k) * step) ** 2
            open_ = best > dz2
            if not open_.any():
                break
            qk = q_layers[dk]
            centre = qk.mean(axis=0)
            a, b = pk[open_] - centre, qk - centre
            d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
            best[open_] = np.minimum(best[open_], np.clip(d2.min(axis=1), 0.0, None) + dz2)
        out[rows] = np.sqrt(best)
    return out


def hd95(a, b, spacing) -> float:
    """95th-percentile Hausdorff distance (mm) between the surfaces of two binary masks.

    The symmetric form max(p95(d_ab), p95(d_ba)), d_ab being the distance from each surface voxel
    of a to the nearest surface voxel of b (surfaces as in `surface`, 6-neighbourhood in 3D).
    Conventions: 0.0 when both masks are empty, inf when exactly one is.
    """
    sa, sb = surface(a), surface(b)
    if not sa.any() and not sb.any():
        return 0.0
    if not sa.any() or not sb.any():
        return float("inf")
    spacing = np.asarray(spacing, dtype=np.float64)
    pa, pb = np.argwhere(sa) * spacing, np.argwhere(sb) * spacing  # (n, d) in mm
    step = float(spacing[-1])
    return float(max(np.percentile(_nearest_distances(pa, pb, step), 95),
                     np.percentile(_nearest_distances(pb, pa, step), 95)))


# ---- measures ----------------------------------------------------------------------------

def pearson(x, y) -> float:
    """Pearson correlation; nan when either input is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def mae(x, y) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(y, dtype=np.float64) - np.asarray(x, dtype=np.float64))))


def bias(x, y) -> float:
    """Mean of y - x (e.g. measured minus requested)."""
    return float(np.mean(np.asarray(y, dtype=np.float64) - np.asarray(x, dtype=np.float64)))


# ---- feature distributions -----------------------------------------------------------------

def gaussian_stats(features) -> tuple:
    """(mu (D,), sigma (D, D)) of features (N, D), float64, sample covariance (N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"gaussian_stats needs (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _rank_clip(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at rounding level (below max * D * eps, the rank tolerance of
    numpy.linalg.matrix_rank) set to 0. Left in, the square roots of a singular covariance's ~D - N
    rounding-level eigenvalues add up to a machine-dependent 1e-6 of the distance."""
    tol = max(float(w.max()), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; rounding-level eigenvalues are zeroed."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_rank_clip(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but of a
    symmetric PSD matrix, so eigh applies and singular covariances (N < D) stay stable.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(_rank_clip(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


# ---- images --------------------------------------------------------------------------------

def psnr(x, y, data_range) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical inputs."""
    mse = np.mean((np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range ** 2 / mse))


SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 3, 0.01, 0.03


def _valid_gaussian(n: int) -> np.ndarray:
    """(n - 2r, n) matrix of the normalised 7-tap Gaussian window at every fully inside position."""
    taps = np.exp(-0.5 * (np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
    taps /= taps.sum()
    m = np.zeros((n - 2 * SSIM_RADIUS, n))
    for i in range(len(m)):
        m[i, i:i + len(taps)] = taps
    return m


def ssim(x, y, data_range) -> float:
    """Mean SSIM (Wang et al. 2004) over every slice of (X, Y, ...) images.

    Gaussian window sigma 1.5 (7 x 7) over (X, Y) only, K1 = 0.01, K2 = 0.03, no sample-covariance
    correction, averaged over the window positions fully inside each slice (MATLAB's 'valid').
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim < 2 or min(x.shape[:2]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs two images of the same shape, at least 7 x 7 in-plane; got {x.shape}, {y.shape}")
    gx, gy = _valid_gaussian(x.shape[0]), _valid_gaussian(x.shape[1])

    def blur(a):  # (X, Y, ...) -> (X - 6, Y - 6, ...)
        return np.einsum("ix,jy,xy...->ij...", gx, gy, a, optimize=True)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ---- coherence -----------------------------------------------------------------------------

def frame_change(cycle) -> np.ndarray:
    """Mean absolute intensity change from each frame to the next of a cycle (X, Y, Z, T), the last
    frame to the first included -> (T,) float64: the image change per frame of `eval --coherence`."""
    cycle = np.asarray(cycle)
    return np.abs(np.roll(cycle, -1, axis=3) - cycle).mean(axis=(0, 1, 2), dtype=np.float64)


def temporal_smoothness(curve) -> float:
    """Mean |second difference| of a periodic curve (T,) divided by its range; 0 for a flat curve.

    Scale-free, so a volume curve in mL and one in voxels score alike; lower is smoother.
    """
    c = np.asarray(curve, dtype=np.float64)
    span = c.max() - c.min()
    if span == 0:
        return 0.0
    return float(np.abs(np.roll(c, -1) - 2 * c + np.roll(c, 1)).mean() / span)


def components_per_slice(mask, label) -> np.ndarray:
    """Connected components of `label` in each slice, 4-connected in-plane: (Z,) int counts ((1,) for a 2D mask).

    Union-find over the in-plane neighbour pairs, vectorised: hook each pair's larger root onto the
    smaller one, compress the paths, repeat until every pair shares a root.
    """
    m = np.asarray(mask)
    m = (m[..., None] if m.ndim == 2 else m) == label  # (X, Y, Z)
    index = np.full(m.shape, -1, dtype=np.int64)
    index[m] = np.arange(int(m.sum()))
    pairs = [np.stack([index[:-1][m[:-1] & m[1:]], index[1:][m[:-1] & m[1:]]]),
             np.stack([index[:, :-1][m[:, :-1] & m[:, 1:]], index[:, 1:][m[:, :-1] & m[:, 1:]]])]
    a, b = np.concatenate(pairs, axis=1)  # (n_pairs,) each: neighbouring foreground voxels
    parent = np.arange(int(m.sum()))
    while True:
        while not np.array_equal(parent, parent[parent]):
            parent = parent[parent]
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
    roots = parent == np.arange(len(parent))
    z = np.nonzero(m)[2]  # slice of each foreground voxel, in index order
    return np.bincount(z[roots], minlength=m.shape[2]).astype(np.int64)


# ---- sharpness -----------------------------------------------------------------------------

def _gaussian_rows(n: int, sigma: float) -> np.ndarray:
    """(n, n) in-plane Gaussian smoothing matrix; rows renormalised at the edges (no zero padding)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    w = np.exp(-0.5 * (d / sigma) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def high_frequency_energy(image, region, sigma: float = 1.0) -> float:
    """Mean squared high-pass detail of (X, Y, ...) images over a boolean region of the same shape.

    The high-pass is image minus its in-plane Gaussian smoothing (std `sigma` voxels): what a blur of
    that size removes, so a blurred copy has less of it. Compare images only on the same grid and
    intensity scale (cine.prep's [-1, 1]). nan for an empty region.
    """
    x, region = np.asarray(image, dtype=np.float64), np.asarray(region, dtype=bool)
    if x.shape != region.shape or x.ndim < 2:
        raise ValueError(f"image {x.shape} and region {region.shape} must be the same (X, Y, ...) shape")
    if not region.any():
        return float("nan")
    smooth = np.einsum("ix,jy,xy...->ij...", _gaussian_rows(x.shape[0], sigma), _gaussian_rows(x.shape[1], sigma),
                       x, optimize=True)
    return float(((x - smooth)[region] ** 2).mean())


# ---- paired comparison ---------------------------------------------------------------------

def paired_permutation_p(differences, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test on per-subject differences (B - A).

    Under the null hypothesis each difference is as likely to have either sign; the statistic is
    |mean|. Exact (all 2^n sign patterns) for n <= 16, else `resamples` random patterns from `seed`
    plus the observed one. 1.0 for all-zero differences; nan for no subjects.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)   # (2^n, n) every pattern
        stats = np.abs(signs @ d) / n
        return float(np.mean(stats >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, n))
    stats = np.abs(signs @ d) / n
    return float((np.sum(stats >= observed - 1e-12) + 1) / (resamples + 1))
