"""Clinical measures against hand-computed values."""
import math

import numpy as np
import pytest

from synth4d.cine.measures import clinical_measures, ejection_fraction, volume_curve, volumes

SPACING = (1.0, 2.0, 5.0)  # 10 mm^3 per voxel = 0.01 mL


def _mask(lv, rv, myo, shape=(10, 10, 6)):
    """A mask with exactly lv, rv, myo voxels of labels 3, 1, 2 (in flat order, disjoint)."""
    flat = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    flat[:lv] = 3
    flat[lv:lv + rv] = 1
    flat[lv + rv:lv + rv + myo] = 2
    return flat.reshape(shape)  # (X, Y, Z)


def test_volumes_are_voxel_count_times_voxel_volume():
    v = volumes(_mask(lv=200, rv=150, myo=80), SPACING)
    assert v == pytest.approx({"lv": 2.0, "rv": 1.5, "myo": 0.8})


def test_volumes_of_empty_mask_are_zero():
    assert volumes(np.zeros((4, 5, 3), np.uint8), (1.5, 1.5, 8.0)) == {"lv": 0.0, "rv": 0.0, "myo": 0.0}


def test_clinical_measures_hand_computed():
    ed, es = _mask(lv=200, rv=150, myo=80), _mask(lv=80, rv=90, myo=95)
    m = clinical_measures(ed, es, SPACING)
    assert m == pytest.approx({"lvedv": 2.0, "lvesv": 0.8, "rvedv": 1.5, "rvesv": 0.9,
                               "lv_mass": 0.8 * 1.05,   # ED myocardium only: the ES 95 voxels do not count
                               "lvef": 60.0, "rvef": 40.0})


def test_clinical_measures_realistic_scale():
    # 1.25 x 1.25 x 10 mm voxels (15.625 mm^3); 9600 LV voxels = 150 mL, 3840 = 60 mL
    ed, es = _mask(lv=9600, rv=0, myo=6400, shape=(40, 40, 10)), _mask(lv=3840, rv=0, myo=0, shape=(40, 40, 10))
    m = clinical_measures(ed, es, (1.25, 1.25, 10.0))
    assert m["lvedv"] == pytest.approx(150.0)
    assert m["lvesv"] == pytest.approx(60.0)
    assert m["lvef"] == pytest.approx(60.0)
    assert m["lv_mass"] == pytest.approx(100.0 * 1.05)


def test_ejection_fraction_nan_without_cavity():
    assert math.isnan(ejection_fraction(0.0, 0.0))
    m = clinical_measures(_mask(lv=10, rv=0, myo=0), _mask(lv=4, rv=0, myo=0), SPACING)
    assert math.isnan(m["rvef"]) and m["lvef"] == pytest.approx(60.0)


def test_volume_curve_per_frame():
    frames = [_mask(lv, 100 - lv, 30) for lv in (100, 70, 40, 70)]
    curve = volume_curve(np.stack(frames, axis=-1), SPACING)  # (X, Y, Z, T)
    np.testing.assert_allclose(curve["lv"], [1.0, 0.7, 0.4, 0.7])
    np.testing.assert_allclose(curve["rv"], [0.0, 0.3, 0.6, 0.3])
    np.testing.assert_allclose(curve["myo"], [0.3] * 4)
    assert curve["lv"].shape == (4,)


def test_volume_curve_rejects_3d():
    with pytest.raises(ValueError):
        volume_curve(np.zeros((4, 4, 2)), SPACING)
