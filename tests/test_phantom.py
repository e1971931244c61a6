"""The 4D phantom: drawn volumes met by the masks, group definitions, layout, reproducibility, vendors."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synth4d.cine import DIAGNOSES, UserError, measures, nifti, phantom
from synth4d.cine.datasets import scan

SMALL = dict(frames=8, matrix=64)
MEASURES = ("lvedv", "lvesv", "rvedv", "rvesv", "lv_mass")


def _case(dx, i=0, vendor="A", **kw):
    return phantom.simulate(np.random.default_rng([17, i]), dx, vendor, **{**SMALL, **kw})


def _measured(case):
    return measures.clinical_measures(case.mask[..., case.ed], case.mask[..., case.es], case.spacing)


@pytest.mark.parametrize("dx", DIAGNOSES)
def test_mask_volumes_meet_the_drawn_values(dx):
    for i in range(3):
        case = _case(dx, i, vendor="ABCD"[i])
        got = _measured(case)
        for name in MEASURES:
            assert got[name] == pytest.approx(case.params[name], rel=0.05), (name, i)
        curve = measures.volume_curve(case.mask, case.spacing)
        assert curve["myo"].max() / curve["myo"].min() < 1.05  # the wall thickens as the cavity empties
        assert np.argmax(curve["lv"]) == case.ed and np.argmin(curve["lv"]) == case.es


def test_groups_follow_the_acdc_definitions():
    lvef = {"NOR": (55, 75), "DCM": (15, 40), "HCM": (60, 80), "MINF": (30, 50), "RV": (55, 70)}
    got = {dx: [_measured(_case(dx, i)) for i in range(4)] for dx in lvef}
    for dx, (lo, hi) in lvef.items():
        for m in got[dx]:
            assert lo - 2 <= m["lvef"] <= hi + 2, (dx, m["lvef"])
            if dx == "RV":  # a dilated, failing RV beside a normal LV
                assert m["rvef"] < 42 and m["rvedv"] > 160
            else:
                assert 43 <= m["rvef"] <= 67
    assert all(m["lvef"] < 40 for m in got["DCM"])
    assert min(m["lvedv"] for m in got["DCM"]) > max(m["lvedv"] for m in got["NOR"] + got["HCM"])


def _max_wall_mm(mask, px):
    """Largest myocardial thickness along rays from the LV centre, over slices with a cavity (mm)."""
    best, angles, steps = 0.0, np.linspace(0, 2 * np.pi, 90, endpoint=False), np.arange(0, 60, 0.2)
    for z in range(mask.shape[2]):
        lv = np.argwhere(mask[:, :, z] == 3)
        if len(lv) < 10:
            continue
        cx, cy = lv.mean(0)
        xs = np.rint(cx + np.outer(np.cos(angles), steps)).astype(int)
        ys = np.rint(cy + np.outer(np.sin(angles), steps)).astype(int)
        inside = (xs >= 0) & (xs < mask.shape[0]) & (ys >= 0) & (ys < mask.shape[1])
        labels = mask[:, :, z][xs.clip(0, mask.shape[0] - 1), ys.clip(0, mask.shape[1] - 1)]
        on_myo = inside & (labels == 2)
        best = max(best, on_myo.sum(1).max() * 0.2 * px)
    return best


def test_hcm_walls_are_thick_and_dcm_walls_thin():
    for i in range(3):
        hcm, dcm = _case("HCM", i, matrix=128), _case("DCM", i, matrix=128)
        assert hcm.params["wall_max_mm"] >= 15
        assert _max_wall_mm(hcm.mask[..., hcm.ed], hcm.spacing[0]) >= 15
        assert _max_wall_mm(dcm.mask[..., dcm.ed], dcm.spacing[0]) < 12


def test_labels_are_nested_lv_inside_myo_rv_outside():
    for i, dx in enumerate(DIAGNOSES):
        case = _case(dx, i, matrix=96)
        m = case.mask
        assert set(np.unique(m)) <= {0, 1, 2, 3}
        lv = m == 3
        for axis in (0, 1):  # every 4-neighbour of an LV pixel is LV or MYO
            for shift in (1, -1):
                nb = np.roll(m, shift, axis=axis)
                assert not np.any(lv & (nb != 3) & (nb != 2)), dx
        assert not np.any(lv.any((0, 1)) & ~(m == 2).any((0, 1)))
        # No RV in the apex-most slice that still has myocardium.
        apex = np.flatnonzero((m[..., case.ed] == 2).any((0, 1)))[-1]
        assert not (m[:, :, apex, case.ed] == 1).any()
        assert (m[:, :, 0, case.ed] == 3).any() and (m[:, :, 0, case.ed] == 1).any()


def _core(region):
    """Pixels whose 4-neighbours share the region: free of partial volume."""
    return region & np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1)


def test_vendors_differ_in_noise_and_contrast():
    noise, contrast = {}, {}
    for name in phantom.VENDORS:
        case = _case("HCM", 0, vendor=name, matrix=128)  # thick walls: a clean myocardial core
        img, m = case.image, case.mask
        edge = np.concatenate([img[:6], img[-6:]])  # static tissue far from the heart
        noise[name] = np.std(edge[..., 0] - edge[..., 1]) / np.sqrt(2) / phantom.VENDORS[name].gain
        ed, m = img[..., case.ed], m[..., case.ed]
        contrast[name] = np.median(ed[_core(m == 2)]) / np.median(ed[_core(m == 3)])
    assert noise["B"] > 2 * noise["D"] and noise["B"] > noise["A"] > noise["D"]
    assert contrast["B"] > contrast["A"] > contrast["C"] + 0.03


def _read_cfg(path):
    return dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in path.read_text().splitlines()))


def test_acdc_layout_and_info(tmp_path):
    paths = list(phantom.write_phantom(tmp_path, n=5, seed=3, progress=False, **SMALL))
    assert [p.name for p in paths] == [f"patient{i:03d}" for i in range(1, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp folders left
    for i, folder in enumerate(paths):
        sid, cfg = folder.name, _read_cfg(folder / "Info.cfg")
        params = json.loads((folder / "params.json").read_text())
        assert cfg["Group"] == DIAGNOSES[i] and cfg["Vendor"] == "ABCD"[i % 4] and cfg["Seed"] == "3"
        assert cfg["ED"] == "1" and int(cfg["ES"]) == params["es"] + 1 and cfg["NbFrame"] == "8"
        assert 150 <= float(cfg["Height"]) <= 198 and 40 <= float(cfg["Weight"]) <= 130
        image, geom = nifti.read(folder / f"{sid}_4d.nii.gz", ndim=4)
        full, mgeom = nifti.read(folder / f"{sid}_4d_gt.nii.gz", ndim=4, kind="mask")
        assert image.shape[3] == 8 and full.shape == image.shape and mgeom == geom
        assert geom.frame_ms == pytest.approx(params["rr_ms"] / 8, rel=1e-4)
        assert np.allclose(np.linalg.norm(geom.affine[:3, :3], axis=0), geom.spacing)
        assert 0 <= image.min() and image.max() < 2000
        for t in (0, params["es"]):
            frame, fgeom = nifti.read(folder / f"{sid}_frame{t + 1:02d}.nii.gz", ndim=3)
            gt, _ = nifti.read(folder / f"{sid}_frame{t + 1:02d}_gt.nii.gz", ndim=3, kind="mask")
            assert np.array_equal(frame, image[..., t]) and np.array_equal(gt, full[..., t])
            assert np.allclose(fgeom.affine, geom.affine)
    # The project's loader reads it back: ED/ES 0-based, masks at ED and ES, the full mask apart.
    ref = scan(tmp_path).refs[1]
    subject = ref.load()
    assert (subject.dx, subject.ed, subject.meta["vendor"]) == ("DCM", 0, "B")
    assert sorted(subject.masks) == [0, subject.es]


def test_seed_reproduces_every_subject_alone_or_in_a_batch(tmp_path):
    a = list(phantom.write_phantom(tmp_path / "a", n=3, seed=9, progress=False, **SMALL))
    b = list(phantom.write_phantom(tmp_path / "b", n=3, seed=9, progress=False, workers=1, **SMALL))
    for pa, pb in zip(a, b):
        for f in sorted(pa.iterdir()):
            if f.suffix == ".gz":
                assert np.array_equal(nifti.read(f)[0], nifti.read(pb / f.name)[0]), f.name
            else:
                assert f.read_text() == (pb / f.name).read_text()
    alone = phantom.simulate(np.random.default_rng([9, 2]), "HCM", "C", **SMALL)
    assert np.array_equal(nifti.read(a[2] / "patient003_4d.nii.gz")[0], alone.image)
    other = next(phantom.write_phantom(tmp_path / "c", n=1, seed=10, progress=False, **SMALL))
    first = [nifti.read(p / "patient001_4d.nii.gz")[0] for p in (other, a[0])]
    assert first[0].shape != first[1].shape or not np.array_equal(*first)


def test_no_half_written_subject_and_resume(tmp_path, monkeypatch):
    real_write, calls = nifti.write, []

    def failing(*args, **kw):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(*args, **kw)
    monkeypatch.setattr(phantom.nifti, "write", failing)
    with pytest.raises(OSError):
        list(phantom.write_phantom(tmp_path, n=1, seed=0, progress=False, **SMALL))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(phantom.nifti, "write", real_write)

    folder = next(phantom.write_phantom(tmp_path, n=1, seed=0, progress=False, **SMALL))
    stamp = (folder / "Info.cfg").stat().st_mtime_ns
    next(phantom.write_phantom(tmp_path, n=1, seed=0, progress=False, **SMALL))  # complete: kept
    assert (folder / "Info.cfg").stat().st_mtime_ns == stamp
    (folder / "patient001_frame01_gt.nii.gz").unlink()                           # incomplete: rewritten
    next(phantom.write_phantom(tmp_path, n=1, seed=0, progress=False, **SMALL))
    assert (folder / "patient001_frame01_gt.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient001"]


def test_bad_requests_are_user_errors(tmp_path):
    for kw in (dict(vendor="Z"), dict(dx="XYZ"), dict(seed=-1)):
        with pytest.raises(UserError):
            next(phantom.write_phantom(tmp_path, n=1, **{"seed": 0, **kw}))
    with pytest.raises(UserError):
        phantom.simulate(np.random.default_rng(0), "NOR", "A", frames=2)


def test_cli_writes_a_default_size_subject(tmp_path):
    import synth4d
    result = CliRunner().invoke(synth4d.cli, ["phantom", str(tmp_path / "out"), "--n", "1", "--dx", "MINF"])
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip())
    assert folder.name == "patient001" and _read_cfg(folder / "Info.cfg")["Group"] == "MINF"
    image, geom = nifti.read(folder / "patient001_4d.nii.gz", ndim=4)
    assert 128 <= image.shape[0] <= 176 and 8 <= image.shape[2] <= 12 and 20 <= image.shape[3] <= 35
    assert 1.3 <= geom.spacing[0] <= 1.8 and 5 <= geom.spacing[2] <= 10
    bad = CliRunner().invoke(synth4d.cli, ["phantom", str(tmp_path / "x"), "--vendor", "Z"])
    assert bad.exit_code != 0


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    list(phantom.write_phantom(tmp_path, n=2, seed=7, frames=4, matrix=32, progress=False))
    list(phantom.write_phantom(tmp_path, n=3, seed=7, frames=4, matrix=32, progress=False))   # continues: fine
    for kw in ({"seed": 8}, {"seed": 7, "dx": "DCM"}, {"seed": 7, "vendor": "B"}):
        with pytest.raises(UserError, match="holds another phantom subject"):
            list(phantom.write_phantom(tmp_path, n=2, frames=4, matrix=32, progress=False, **kw))
    list(phantom.write_phantom(tmp_path, n=1, seed=8, frames=4, matrix=32, progress=False, overwrite=True))


def test_trabeculae_and_moderator_band_sit_where_they_belong():
    """LV trabeculae reach into the cavity from the free wall (not the smooth septum), mid-ventricle to apex,
    up to a quarter of the radius; the RV's from its free wall; the moderator band crosses the whole RV
    cavity at one level; the masks count them as cavity (volumes unchanged, as the volume test checks)."""
    from synth4d.cine.heart import _THETA, Heart, draw_parameters
    for i, dx in enumerate(DIAGNOSES):
        rng = np.random.default_rng([3, i])
        heart = Heart(rng, dx, draw_parameters(rng, dx), 10)
        d = np.linspace(0, heart.apex, 40)
        rn, re, ro = heart.radii(heart.shape(d, 0.0), 1.0, 1.0, 1.0)
        lv, rv = heart.trabeculae(d, 0.0, rn, re, ro)
        assert np.all(lv <= rn) and np.all(lv >= 0.7 * rn)
        u = d / heart.apex
        assert np.all(lv[u < 0.2] == rn[u < 0.2])                                  # none at the base
        septum = np.abs(np.angle(np.exp(1j * (_THETA - heart.rv_dir)))) < 0.7
        assert np.all(lv[:, septum] == rn[:, septum])                              # a smooth septum
        assert (lv[:, ~septum] < 0.95 * rn[:, ~septum]).any()                      # fingers elsewhere
        assert np.all((rv <= ro) & (rv >= re))
        # the moderator band spans the RV cavity (where there is one) at its own level and angle
        at = [heart.band[0] * heart.apex]
        rn1, re1, ro1 = heart.radii(heart.shape(at, 0.0), 1.0, 1.0, 1.0)
        k = np.argmax(heart.band[1])
        assert heart.trabeculae(at, 0.0, rn1, re1, ro1)[1][0, k] <= re1[0, k] + 0.1 * (ro1[0, k] - re1[0, k])
        assert 3 <= heart.rv_wall <= 5


def test_trabeculae_darken_the_lv_cavity_near_its_wall():
    """In the image: pixels labelled LV but as dark as myocardium, at mid-ventricular to apical slices."""
    dark = []
    for i in range(3):
        case = _case("NOR", i, matrix=128, vendor="A")
        img, m = case.image[..., case.ed], case.mask[..., case.ed]
        blood = np.median(img[_core(m == 3)])
        myo = np.median(img[_core(m == 2)])
        z = slice(m.shape[2] // 2, None)
        dark.append(np.mean(img[:, :, z][m[:, :, z] == 3] < (blood + myo) / 2))
    assert 0.02 < np.mean(dark) < 0.4, dark
