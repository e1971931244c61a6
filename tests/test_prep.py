"""cine.prep: geometry of the heart-centred grid, intensities, slices, the unlabelled centre finder,
the round trip back to the source grid, and the prepared-subject cache."""
import os

import numpy as np
import pytest

from synth4d.cine import DataError, nifti
from synth4d.cine.measures import clinical_measures
from synth4d.cine.metrics import dice
from synth4d.cine.prep import (find_heart_centre, grid_affine, prepare_dataset, prepare_image, prepare_subject, split_ids,
                       to_source)
from synth4d.cine.subject import Subject
from synth4d.nets.config import GridConfig


def _affine(spacing, origin, flip_x=True):
    """Voxel -> world with spacing, a world origin and (as in many scanners) a flipped first axis."""
    a = np.diag([-spacing[0] if flip_x else spacing[0], spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def _ball_mask(shape, affine, centre_mm, radius_mm):
    """Voxels whose centre lies within radius_mm of the world point centre_mm."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)  # (X, Y, Z, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - np.asarray(centre_mm), axis=-1) <= radius_mm


def _heart(shape, affine, centre_mm, scale=1.0):
    """A crude labelled heart: LV ball, myocardium shell, RV ball beside it (mm radii scaled by `scale`)."""
    m = np.zeros(shape, np.uint8)
    m[_ball_mask(shape, affine, np.add(centre_mm, (-22, 4, 0)), 14 * scale)] = 1
    m[_ball_mask(shape, affine, centre_mm, 16 * scale)] = 2
    m[_ball_mask(shape, affine, centre_mm, 11 * scale)] = 3
    return m


def _subject(shape=(71, 63, 7, 5), spacing=(1.3, 0.9, 6.0), centre=(-40.0, 35.0, 10.0), seed=0):
    """A labelled cine (ED 0, ES 3) whose image is the mask plus noise, with a smaller heart at ES."""
    affine = _affine(spacing, origin=(10.0, -5.0, -8.0))
    ed, es = _heart(shape[:3], affine, centre), _heart(shape[:3], affine, centre, scale=0.8)
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    for t in range(shape[3]):
        image[..., t] += 200 * (ed if t < 3 else es)
    return Subject("s1", image, affine, spacing, 30.0, {0: ed, 3: es}, ed=0, es=3, dx="NOR", path="s1.nii.gz")


def _permuted(s: Subject, perm):
    """The same subject stored with its voxel axes in another order (same world geometry)."""
    p = np.eye(4)[:, list(perm) + [3]]  # new voxel index -> old voxel index
    return Subject(s.id, np.transpose(s.image, perm + (3,)), s.affine @ p, tuple(s.spacing[a] for a in perm),
                   s.frame_ms, {t: np.transpose(m, perm) for t, m in s.masks.items()}, s.ed, s.es, s.dx, path=s.path)


GRID = GridConfig(spacing=2.0, size=33, slices=9)


def test_resampling_weights_interpolate_and_anti_alias():
    from synth4d.cine.prep import _weights
    x = np.random.default_rng(0).random(20)
    np.testing.assert_allclose(_weights(10, 20, 3.0, 1.0) @ x, x[3:13], rtol=1e-6)            # whole-voxel crop: a copy
    pos = 2.3 + 0.4 * np.arange(30)
    np.testing.assert_allclose(_weights(30, 20, 2.3, 0.4) @ x, np.interp(pos, np.arange(20), x), rtol=1e-5)
    stripes = np.arange(40) % 2.0
    np.testing.assert_allclose(_weights(15, 40, 4.0, 2.0) @ stripes, 0.5, rtol=1e-6)  # area averaging: no aliasing
    w = _weights(8, 20, -5.0, 3.0)  # samples at -5, -2, ..., 16
    assert w.sum(1)[0] == 0 and w.sum(1)[-1] == pytest.approx(1.0)  # beyond the field of view: background
    np.testing.assert_array_equal(_weights(4, 10, 0.4, 2.0, "nearest").argmax(1), [0, 2, 4, 6])


def test_sphere_lands_at_the_grid_centre_with_its_size():
    shape, spacing, centre, radius = (71, 63, 7, 2), (1.3, 0.9, 6.0), (-40.0, 35.0, 12.0), 18.0
    affine = _affine(spacing, (10.0, -5.0, -8.0))
    lv = _ball_mask(shape[:3], affine, centre, radius).astype(np.uint8) * 3
    s = Subject("ball", np.repeat(lv[..., None], 2, -1).astype(np.float32), affine, spacing, None, {0: lv})
    p = prepare_subject(s, GRID)
    assert p.image.shape == (33, 33, 9, 2) and p.masks[0].shape == (33, 33, 9)
    assert p.spacing == (2.0, 2.0, 6.0) and p.n_slices == 7
    ijk = np.argwhere(p.masks[0] == 3)
    # In-plane the crop origin snaps to a whole source voxel: the centre moves by at most half a one.
    np.testing.assert_allclose(ijk[:, :2].mean(0), [16, 16], atol=0.5 * 1.3 / 2.0 + 0.05)
    world = grid_affine(p) @ np.r_[ijk.mean(0), 1.0]
    np.testing.assert_allclose(world[:3], centre, atol=0.8)
    grid_ml, source_ml = (p.masks[0] == 3).sum() * 2 * 2 * 6 / 1000, (lv == 3).sum() * np.prod(spacing) / 1000
    assert grid_ml == pytest.approx(source_ml, rel=0.03)
    assert source_ml == pytest.approx(4 / 3 * np.pi * radius ** 3 / 1000, rel=0.08)
    extent_mm = np.ptp(ijk[:, 0]) * 2.0 + 2.0
    assert extent_mm == pytest.approx(2 * radius, abs=2.5)


@pytest.mark.parametrize("perm, swapped", [((0, 2, 1), False), ((2, 0, 1), False), ((1, 2, 0), True)])
def test_slice_axis_anywhere_gives_the_same_grid(perm, swapped):
    """Stored with the slice axis first or in the middle, a subject prepares to the same grid; in-plane
    axes keep their voxel order, so storing y before x gives the transposed grid."""
    s = _subject()
    t = _permuted(s, perm)
    ref, p = prepare_subject(s, GRID), prepare_subject(t, GRID)
    assert p.src["perm"][2] == perm.index(2) and p.spacing == ref.spacing
    order = (1, 0, 2) if swapped else (0, 1, 2)
    np.testing.assert_array_equal(p.image, ref.image.transpose(order + (3,)))
    np.testing.assert_array_equal(p.masks[3], ref.masks[3].transpose(order))
    for ijk in ([0, 0, 0], [5, 30, 8], [32, 1, 3]):
        mapped = [ijk[i] for i in order]
        np.testing.assert_allclose(grid_affine(p) @ (mapped + [1]), grid_affine(ref) @ (ijk + [1]), atol=1e-6)
    back = to_source(p.masks[0], p)
    assert back.shape == t.image.shape[:3]
    np.testing.assert_array_equal(back, np.transpose(to_source(ref.masks[0], ref), perm))


def test_intensity_range_and_measures_from_source_masks():
    s = _subject()
    p = prepare_subject(s, GRID)
    assert p.image.dtype == np.float32 and p.image.min() == -1.0 and p.image.max() == 1.0
    data = p.image[:, :, :p.n_slices]
    assert 0.002 < np.mean(data == 1.0) < 0.01   # the top 0.5 % clip to 1
    assert p.src["intensity"][0] < 120 < 250 < p.src["intensity"][1]
    assert p.measures == clinical_measures(s.masks[0], s.masks[3], s.spacing)
    assert p.measures["lvef"] > 0


def test_padding_and_slice_block():
    s = _subject(shape=(40, 40, 5, 4), spacing=(2.0, 2.0, 8.0), centre=(-40.0, 20.0, 16.0))
    p = prepare_subject(s, GRID)
    assert p.n_slices == 5 and p.src["z0"] == 0
    assert np.all(p.image[:, :, 5:] == -1) and not p.masks[0][:, :, 5:].any() and p.masks[0][:, :, :5].any()
    # 14 slices with the heart near the top: the kept block of 9 holds it all; unlabelled: the central block.
    s = _subject(shape=(40, 40, 14, 4), spacing=(2.0, 2.0, 5.0), centre=(-40.0, 20.0, 40.0))
    heart_slices = np.flatnonzero(s.masks[0].any(axis=(0, 1)))
    p = prepare_subject(s, GRID)
    assert p.n_slices == 9 and p.src["z0"] <= heart_slices[0] and heart_slices[-1] < p.src["z0"] + 9
    assert (p.masks[0] > 0).sum() * 4 * 5 == pytest.approx((s.masks[0] > 0).sum() * 4 * 5, rel=0.03)
    q = prepare_image(s.image, nifti.Geometry(s.affine, s.spacing, 30.0), GRID, id="u")
    assert q.src["z0"] == 2 and q.masks == {} and q.measures == {}


def _beating_blob(shape=(64, 56, 6, 12), centre=(40.3, 21.7), seed=0):
    """A bright disc whose radius beats over the cycle, a static bright disc elsewhere, noise everywhere."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - centre[0], y - centre[1])
    image = rng.normal(0.3, 0.15, size=shape).astype(np.float32)
    image += 1.5 * (np.hypot(x - 12, y - 40) < 7)[..., None, None]  # static: not the heart
    for t in range(shape[3]):
        radius = 7 + 3 * np.cos(2 * np.pi * t / shape[3])
        image[..., t] += (r < radius)[..., None]
    return image


def test_heart_centre_from_motion_alone():
    image = _beating_blob()
    cx, cy = find_heart_centre(image, (2.0, 2.0, 8.0))
    assert np.hypot(cx - 40.3, cy - 21.7) * 2.0 < 5.0
    p = prepare_image(image, nifti.Geometry.from_spacing((2.0, 2.0, 8.0), 40.0), GridConfig(2.0, 24, 8))
    assert np.linalg.norm((grid_affine(p) @ [11.5, 11.5, 0, 1])[:2] - [40.3 * 2, 21.7 * 2]) < 5.0


@pytest.mark.parametrize("spacing", [(1.3, 0.9, 6.0), (3.1, 2.9, 6.0)])  # the grid finer, or coarser, than the source
def test_round_trip_to_source(spacing):
    shape = (int(90 / spacing[0]) | 1, int(80 / spacing[1]), 7, 4)
    s = _subject(shape=shape, spacing=spacing, centre=(-40.0, 30.0, 12.0))
    p = prepare_subject(s, GRID)
    onehot = np.stack([p.masks[0] == c for c in range(4)]).astype(np.float32)  # (C, X, Y, Z)
    prob = to_source(onehot, p)
    assert prob.shape == (4,) + shape[:3]
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    assert np.all(prob[0][0] == 1.0) or np.all(prob[0][-1] == 1.0)  # outside the crop: background
    back = prob.argmax(0)
    assert min(dice(back, s.masks[0]).values()) > 0.9
    labels = to_source(p.masks[0], p)
    assert labels.dtype == np.uint8 and min(dice(labels, s.masks[0]).values()) > 0.9
    series = to_source((p.image[None] > 0).astype(np.float32), p)  # (1, X, Y, Z, T): a trailing T axis
    assert series.shape == (1,) + shape


def test_bad_mask_is_a_data_error():
    s = _subject(shape=(30, 30, 4, 4), spacing=(2.0, 2.0, 8.0), centre=(-30.0, 20.0, 8.0))
    s.masks[0] = s.masks[0][:-1]
    with pytest.raises(DataError, match="does not fit"):
        prepare_subject(s, GRID)


def _write_acdc(root, n=2):
    for i in range(1, n + 1):
        s = _subject(shape=(30, 28, 4, 4), spacing=(2.5, 2.5, 8.0), centre=(-35.0, 30.0, 8.0), seed=i)
        d = root / f"patient{i:03d}"
        geom = nifti.Geometry(s.affine, s.spacing, 30.0)
        nifti.write(d / f"patient{i:03d}_4d.nii.gz", s.image, geom)
        for t in (0, 3):
            nifti.write(d / f"patient{i:03d}_frame{t + 1:02d}_gt.nii.gz", s.masks[t],
                        nifti.Geometry(s.affine, s.spacing, None), kind="mask")
        (d / "Info.cfg").write_text("ED: 1\nES: 4\nGroup: NOR\nHeight: 170\nWeight: 70\nNbFrame: 4\n")


def test_prepare_dataset_cache_hit_and_invalidation(tmp_path, monkeypatch):
    import synth4d.cine.prep
    _write_acdc(tmp_path / "data")
    grid, cache = GridConfig(3.0, 16, 5), tmp_path / "cache"
    first = prepare_dataset(tmp_path / "data", grid, cache_dir=cache, progress=False)
    assert [p.id for p in first] == ["patient001", "patient002"] and first[0].es == 3 and first[0].dx == "NOR"
    files = sorted((cache / "prep").iterdir())
    assert len(files) == 2 and all(f.suffix == ".npz" and not f.name.startswith(".tmp") for f in files)

    calls = []
    real = synth4d.cine.prep.prepare_subject
    monkeypatch.setattr(synth4d.cine.prep, "prepare_subject", lambda s, g: calls.append(s.id) or real(s, g))
    again = prepare_dataset(tmp_path / "data", grid, cache_dir=cache, progress=False)
    assert calls == []
    for a, b in zip(first, again):
        np.testing.assert_allclose(a.image, b.image, atol=1e-3)
        np.testing.assert_array_equal(a.masks[3], b.masks[3])
        assert a.src["perm"] == b.src["perm"] and np.allclose(a.src["affine"], b.src["affine"])
        assert a.measures == pytest.approx(b.measures) and a.meta == b.meta and a.spacing == b.spacing

    prepare_dataset(tmp_path / "data", GridConfig(3.0, 18, 5), cache_dir=cache, progress=False)
    assert calls == ["patient001", "patient002"]
    img = tmp_path / "data" / "patient002" / "patient002_4d.nii.gz"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    prepare_dataset(tmp_path / "data", grid, cache_dir=cache, progress=False)
    assert calls == ["patient001", "patient002", "patient002"]


def test_prepare_dataset_skips_unreadable_subjects(tmp_path, capsys):
    _write_acdc(tmp_path, n=2)
    (tmp_path / "patient002" / "patient002_4d.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError):
        prepare_dataset(tmp_path, GridConfig(3.0, 16, 5), cache_dir=tmp_path / "c", progress=False)
    out = prepare_dataset(tmp_path, GridConfig(3.0, 16, 5), cache_dir=tmp_path / "c", skip_bad=True, progress=False)
    assert [p.id for p in out] == ["patient001"] and "patient002" in capsys.readouterr().err


def test_split_ids():
    ids = [f"p{i:03d}" for i in range(20)]
    train, val = split_ids(ids, 0.2, seed=1)
    assert len(val) == 4 and sorted(train + val) == ids and not set(train) & set(val)
    assert split_ids(list(reversed(ids)), 0.2, seed=1) == (train, val)
    assert split_ids(ids, 0.2, seed=2) != (train, val)
    assert len(split_ids(ids[:2], 0.01, seed=0)[1]) == 1
    assert split_ids(ids[:1], 0.5, seed=0) == (ids[:1], [])
