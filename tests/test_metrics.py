"""cine.metrics against trusted references (scipy) and known answers."""
import numpy as np
import pytest
from scipy import linalg, ndimage

from synth4d.cine.metrics import (bias, components_per_slice, dice, dice_binary, frechet_distance, gaussian_stats, hd95, mae,
                          pearson, psnr, ssim, surface, temporal_smoothness)


def _ball(shape, centre, radius, spacing=(1, 1, 1)):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def _blob(rng, shape, smooth=2.0, level=0.6):
    field = ndimage.gaussian_filter(rng.random(shape), smooth)
    return field > np.quantile(field, level)


def _hd95_reference(a, b, spacing):
    """MedPy-style surface distances from scipy's distance transform, combined as max of directed p95s."""
    def directed(p, q):
        sp = p & ~ndimage.binary_erosion(p, ndimage.generate_binary_structure(p.ndim, 1))
        sq = q & ~ndimage.binary_erosion(q, ndimage.generate_binary_structure(q.ndim, 1))
        return ndimage.distance_transform_edt(~sq, sampling=spacing)[sp]
    return max(np.percentile(directed(a, b), 95), np.percentile(directed(b, a), 95))


def test_dice_known_values_and_empty_convention():
    a = np.zeros((4, 4, 2), np.uint8)
    b = np.zeros_like(a)
    a[:2, :, 0] = 3       # 8 voxels of LV
    b[:1, :, 0] = 3       # 4 of them
    b[0, 0, 1] = 1        # RV only in b
    d = dice(a, b)
    assert d[3] == pytest.approx(2 * 4 / 12)
    assert d[1] == 0.0
    assert d[2] == 1.0    # absent from both
    assert dice_binary(np.zeros(3), np.zeros(3)) == 1.0


def test_surface_matches_scipy_erosion():
    m = _blob(np.random.default_rng(0), (15, 12, 7))
    ref = m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(surface(m), ref)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.25, 0.8, 6.0)])
def test_hd95_matches_scipy_reference_on_random_blobs(spacing):
    rng = np.random.default_rng(1)
    a, b = _blob(rng, (24, 21, 9)), _blob(rng, (24, 21, 9))
    assert hd95(a, b, spacing) == pytest.approx(_hd95_reference(a, b, spacing), rel=1e-9)


def test_hd95_known_answers():
    shape = (40, 40, 40)
    a = _ball(shape, (20, 20, 20), 10)
    assert hd95(a, a, (1, 1, 1)) == 0.0
    # A cube shifted by 3 voxels along Z at 2 mm slices: the far faces are 6 mm apart, most points less.
    c = np.zeros((20, 20, 20), bool)
    c[5:15, 5:15, 5:15] = True
    d = np.roll(c, 3, axis=2)
    assert hd95(c, d, (1, 1, 2)) == pytest.approx(_hd95_reference(c, d, (1, 1, 2)))
    assert 0 < hd95(c, d, (1, 1, 2)) <= 6.0
    # Concentric balls of radius 10 and 6 mm: the surfaces are about 4 mm apart everywhere.
    assert hd95(a, _ball(shape, (20, 20, 20), 6), (1, 1, 1)) == pytest.approx(4.0, abs=1.0)
    assert hd95(np.zeros(shape, bool), np.zeros(shape, bool), (1, 1, 1)) == 0.0
    assert hd95(a, np.zeros(shape, bool), (1, 1, 1)) == float("inf")


def test_pearson_mae_bias():
    rng = np.random.default_rng(2)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert np.isnan(pearson(np.ones(5), np.arange(5)))
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert bias([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


def _frechet_reference(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [16, 64])
def test_frechet_distance_matches_sqrtm(d):
    rng = np.random.default_rng(d)
    f1 = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
    f2 = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    (mu1, s1), (mu2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (d, d)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_identical_and_singular():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(200, 32))
    mu, s = gaussian_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    # N < D: rank-deficient covariances, where a plain sqrtm of the product is fragile.
    g1, g2 = rng.normal(size=(10, 48)), rng.normal(size=(12, 48)) + 0.2
    (m1, c1), (m2, c2) = gaussian_stats(g1), gaussian_stats(g2)
    fd = frechet_distance(m1, c1, m2, c2)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(_frechet_reference(m1, c1, m2, c2), rel=1e-4)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-6)


def _ssim_reference(x, y, data_range):
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for k in range(x.shape[2]):
        a, b = x[:, :, k], y[:, :, k]
        f = lambda im: ndimage.gaussian_filter(im, 1.5, truncate=2.0)[3:-3, 3:-3]  # 7-tap window, 'valid' part
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        vals.append(((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(vals))


def test_ssim_and_psnr():
    rng = np.random.default_rng(4)
    x = ndimage.gaussian_filter(rng.random((23, 19, 3)), 2)
    y = x + rng.normal(scale=0.02, size=x.shape)
    assert ssim(x, y, 1.0) == pytest.approx(_ssim_reference(x, y, 1.0), rel=1e-9)
    assert ssim(x, x, 1.0) == pytest.approx(1.0)
    assert ssim(x, y, 1.0) < 1.0
    assert psnr(x, x + 0.1, 1.0) == pytest.approx(20.0)
    assert psnr(x, x, 1.0) == float("inf")
    with pytest.raises(ValueError):
        ssim(x[:5], y[:5], 1.0)


def test_temporal_smoothness():
    t = np.arange(30)
    smooth = np.cos(2 * np.pi * t / 30)
    assert temporal_smoothness(smooth) == pytest.approx(np.mean(np.abs(np.diff(np.r_[smooth[-1], smooth, smooth[0]], 2))) / 2)
    assert temporal_smoothness(100 * smooth + 5) == pytest.approx(temporal_smoothness(smooth))
    jagged = smooth + 0.3 * (-1) ** t
    assert temporal_smoothness(jagged) > 5 * temporal_smoothness(smooth)
    assert temporal_smoothness(np.full(10, 3.0)) == 0.0


def test_components_per_slice_matches_scipy_label():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=(17, 13, 6)).astype(np.uint8)
    labels[:, :, 5] = 0   # an empty slice
    for label in (1, 3):
        expected = [ndimage.label(labels[:, :, k] == label)[1] for k in range(6)]
        np.testing.assert_array_equal(components_per_slice(labels, label), expected)
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 2
    ring[3:6, 3:6] = 0
    ring[0, 0] = ring[8, 8] = 2   # two more, touching the ring only diagonally or not at all
    assert components_per_slice(ring, 2).tolist() == [3]
