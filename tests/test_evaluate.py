"""`synth4d eval`: diagnosis criteria, wall thickness, controllability, coherence, reconstruction, FVD and the CLI."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from synth4d.cine import UserError, nifti
from synth4d.cine.datasets import scan
from synth4d.cine.diagnosis import LV_DILATED, meets
from synth4d.cine.measures import clinical_measures, wall_thickness
from synth4d.cine.prep import prepare_subject
from synth4d.cine.metrics import components_per_slice, temporal_smoothness
from synth4d.nets.config import GridConfig, get_preset
from synth4d.nets.i3d import I3DFeatures, InceptionI3d
from synth4d.nets.vae import VAE
from synth4d import cli
from synth4d.jobs.evaluate import ES_FAR, _manifest, controllability, es_phase_spread, evaluate
from synth4d.jobs.fvd import cycle_frames, fvd_report
from synth4d.weights.checkpoint import load_vae, save_checkpoint

PX, SLICE, Z, N = 3.0, 10.0, 4, 48          # fake generated set: 3 mm pixels, 4 slices of 10 mm, 48 x 48
VOXEL_ML = PX * PX * SLICE / 1000
PRIORS = ("lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass")
# Per subject: requested group, LV radius (px) at frames 0 (ED), 1 (ES), 2; RV box length (px) at the same frames.
FAKE = [("DCM", (14, 12.5, 13), (30, 22, 26)), ("NOR", (9, 5.5, 7), (30, 15, 22)),
        ("MINF", (10, 6, 8), (28, 14, 20)), ("", (11, 7, 9), (26, 12, 20))]


def _fake_subject(lv_radii, rv_lengths):
    """(X, Y, Z, T) mask: an LV disk, a 3-px MYO ring around it, a 5-px wide RV box; and an image of it."""
    x, y = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    r = np.hypot(x - 24, y - 24)
    mask = np.zeros((N, N, Z, len(lv_radii)), np.uint8)
    for t, (radius, length) in enumerate(zip(lv_radii, rv_lengths)):
        m = np.zeros((N, N), np.uint8)
        m[r <= radius + 3], m[r <= radius] = 2, 3
        m[1:6, 4:4 + length] = 1
        mask[..., t] = m[..., None]
    image = np.choose(mask, [100, 800, 300, 900]).astype(np.int16)
    return image + np.random.default_rng(0).integers(0, 30, image.shape).astype(np.int16), mask


def _counted(mask):
    """Clinical measures from voxel counts, by hand (frame 1 is ES by construction)."""
    ml = lambda t, label: float((mask[..., t] == label).sum()) * VOXEL_ML  # noqa: E731
    m = {"lvedv": ml(0, 3), "lvesv": ml(1, 3), "rvedv": ml(0, 1), "rvesv": ml(1, 1), "lv_mass": ml(0, 2) * 1.05}
    m["lvef"], m["rvef"] = 100 * (1 - m["lvesv"] / m["lvedv"]), 100 * (1 - m["rvesv"] / m["rvedv"])
    return m


@pytest.fixture(scope="module")
def fake_set(tmp_path_factory):
    """A generated set as `synth4d generate` writes it (flat layout) with requested = measured + known offsets."""
    root = tmp_path_factory.mktemp("generated")
    geom = nifti.Geometry.from_spacing((PX, PX, SLICE), frame_ms=300.0)
    rows, truth = [], []
    for i, (dx, radii, lengths) in enumerate(FAKE):
        image, mask = _fake_subject(radii, lengths)
        sid = f"synth_{i:04d}"
        nifti.write(root / f"{sid}.nii.gz", image, geom)
        nifti.write(root / f"{sid}_mask.nii.gz", mask, geom, kind="mask")
        m = _counted(mask)
        requested = {k: m[k] * (1 + 0.1 * np.sin(3 * i + j)) + 2 * j for j, k in enumerate(PRIORS)}
        truth.append((m, requested))
        row = {"id": sid, "seed": i, "attempts": 1, "plausible": "yes", "dx": dx, "ed": 0, "es": 1, "frames": 3,
               "slices": Z, "slice_mm": SLICE}
        for k in PRIORS:
            row.update({f"requested_{k}": round(requested[k], 3), f"given_{k}": 1, f"measured_{k}": round(m[k], 3)})
        row["files"] = f"{sid}.nii.gz;{sid}_mask.nii.gz"
        rows.append(row)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root, truth


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from synth4d.cine.phantom import write_phantom
    root = tmp_path_factory.mktemp("phantom2")
    list(write_phantom(root, n=2, seed=0, frames=4, matrix=48, progress=False))
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    p = get_preset("tiny")
    save_checkpoint(folder / "vae.safetensors", VAE(p.vae), "vae", p.vae,
                    {"grid": dataclasses.asdict(p.grid), "scale": 1.0, "preset": "tiny"})
    return folder


# ---- diagnosis criteria and wall thickness -------------------------------------------------

def test_criteria_on_hand_made_measures():
    nor = {"lvedv": 140.0, "lvef": 62.0, "rvedv": 150.0, "rvef": 55.0, "max_wall": 10.0}
    assert meets("NOR", nor) and not meets("NOR", {**nor, "max_wall": 16.0}) and not meets("NOR", {**nor, "rvef": 35.0})
    assert meets("DCM", {**nor, "lvedv": LV_DILATED + 1, "lvef": 30.0})
    assert not meets("DCM", {**nor, "lvedv": LV_DILATED - 1, "lvef": 30.0})
    assert not meets("DCM", {**nor, "lvedv": 260.0})
    assert meets("HCM", {**nor, "max_wall": 18.0}) and not meets("HCM", {**nor, "max_wall": 18.0, "lvef": 50.0})
    assert meets("MINF", {**nor, "lvef": 42.0}) and not meets("MINF", nor)
    assert meets("RV", {**nor, "rvef": 30.0}) and meets("RV", {**nor, "rvedv": 230.0}) and not meets("RV", nor)
    assert meets(None, nor) is None and meets("XYZ", nor) is None
    assert meets("NOR", {**nor, "lvef": float("nan")}) is None and meets("RV", {"rvedv": 200.0}) is None


def test_wall_thickness_known_answers():
    m = np.zeros((40, 40, 3), np.uint8)
    m[:, 10:16, 0], m[:, 16:30, 0] = 2, 3     # a flat wall 6 px thick beside the cavity
    m[5:35, 5:35, 2] = 2                      # an apical cap: myocardium without a cavity, not counted
    assert wall_thickness(m, (1.5, 1.5, 8.0)) == pytest.approx(9.0)
    x, y = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    ring = np.zeros((60, 60, 1), np.uint8)
    ring[np.hypot(x - 30, y - 30) < 18, 0] = 2
    ring[np.hypot(x - 30, y - 30) < 12, 0] = 3
    assert 6.0 <= wall_thickness(ring, (1.0, 1.0, 8.0)) <= 6.0 + np.sqrt(2)
    assert wall_thickness(np.zeros((5, 5, 2)), (1, 1, 1)) == 0.0


def test_phantom_subjects_meet_their_group_criteria(tmp_path):
    from synth4d.cine.measures import clinical_measures
    from synth4d.cine.phantom import write_phantom
    list(write_phantom(tmp_path, n=10, seed=0, frames=4, progress=False))
    verdicts = []
    for ref in scan(tmp_path).refs:
        s = ref.load()
        m = clinical_measures(s.full_mask[..., s.ed], s.full_mask[..., s.es], s.spacing)
        verdicts.append(meets(s.dx, {**m, "max_wall": wall_thickness(s.full_mask[..., s.ed], s.spacing)}))
    assert np.mean(verdicts) >= 0.9, verdicts


# ---- controllability -----------------------------------------------------------------------

def test_controllability_against_numpy(fake_set):
    root, truth = fake_set
    out = controllability(scan(root), _manifest(root))
    assert out["subjects"] == len(FAKE)
    for k in PRIORS:
        requested = np.array([req[k] for _, req in truth])
        measured = np.array([m[k] for m, _ in truth])
        got = out["priors"][k]
        assert got["n"] == len(FAKE)
        assert got["r"] == pytest.approx(np.corrcoef(requested, measured)[0, 1], abs=1e-4)
        assert got["mae"] == pytest.approx(np.abs(measured - requested).mean(), abs=1e-3)
        assert got["bias"] == pytest.approx((measured - requested).mean(), abs=1e-3)
    d = out["diagnosis"]   # DCM and NOR meet their criteria; the MINF subject's LVEF is normal; "" is unknown
    assert d["n"] == 3 and d["rate"] == pytest.approx(2 / 3)
    assert {dx: v["rate"] for dx, v in d["per_dx"].items()} == {"DCM": 1.0, "MINF": 0.0, "NOR": 1.0}


# ---- temporal coherence --------------------------------------------------------------------

def test_cycle_frames_periodic_resampling():
    image = np.arange(4, dtype=np.float32)[None, None, None, :] * np.ones((2, 2, 1, 1), np.float32)
    out = cycle_frames(image, ed=1, n=8)
    np.testing.assert_allclose(out[0, 0, 0], [1, 1.5, 2, 2.5, 3, 1.5, 0, 0.5])


def test_es_phase_spread_robust_and_circular():
    # Median 0.35; distances 0.05 0.03 0.01 0.01 0.03 and 0.4 (0.95 is 0.4 from 0.35 around the cycle).
    out = es_phase_spread([0.30, 0.32, 0.34, 0.36, 0.38, 0.95])
    assert out["es_phase_mad_sd"] == pytest.approx(1.4826 * 0.03) and out["es_phase_far"] == 1
    # 0.98 is 0.05 from the median 0.03 around the cycle, not 0.95: not far.
    assert es_phase_spread([0.02, 0.02, 0.04, 0.98])["es_phase_far"] == 0
    # On normal data the robust figure reads as the sd; one flat-curve outlier moves the sd, not it.
    rng = np.random.default_rng(0)
    p = 0.34 + 0.03 * rng.standard_normal(20000)
    assert es_phase_spread(p)["es_phase_mad_sd"] == pytest.approx(np.std(p), rel=0.03)
    q = np.r_[p[:40], 0.8]
    assert np.std(q, ddof=1) > 2 * np.std(p[:40], ddof=1)
    assert es_phase_spread(q)["es_phase_mad_sd"] == pytest.approx(es_phase_spread(p[:40])["es_phase_mad_sd"], rel=0.15)
    assert es_phase_spread(q)["es_phase_far"] == 1 and ES_FAR < 0.8 - 0.34
    assert es_phase_spread([0.3]) == {"es_phase_mad_sd": None, "es_phase_far": None}


def test_coherence_on_the_phantom(tiny_phantom, fake_set):
    out = evaluate(tiny_phantom, fake_set[0], coherence=True)["coherence"]
    real, gen = out["real"], out["generated"]
    ds = scan(tiny_phantom)
    subjects = [ref.load() for ref in ds.refs]
    assert real["subjects"] == real["full_cycle_masks"] == len(subjects)
    rough = np.mean([temporal_smoothness(np.count_nonzero(s.full_mask == 3, axis=(0, 1, 2))) for s in subjects])
    assert real["lv_curve_roughness"] == pytest.approx(rough)
    assert real["es_phase"] == pytest.approx(np.mean([(s.es - s.ed) / s.n_frames for s in subjects]))
    assert real["ed_offset"] == 0.0      # the phantom's LV is largest at its ED frame
    counts = [components_per_slice(s.full_mask[..., t], 3) for s in subjects for t in range(s.n_frames)]
    lv_one = sum(int((c == 1).sum()) for c in counts) / sum(int((c > 0).sum()) for c in counts)
    assert real["one_component"]["LV"] == pytest.approx(lv_one) and lv_one > 0.9
    assert 0 < real["image_change"] and 0 < real["image_change_roughness"] and 0 < gen["image_change"]
    # ED-ES change on the common grid: the real set's own ED / ES frames, the generated set's LV minimum (frame 1)
    from synth4d.jobs.evaluate import _generated_grid
    grid = _generated_grid(scan(fake_set[0]))
    preps = [prepare_subject(s, grid) for s in subjects]
    assert real["ed_es_subjects"] == len(preps)
    assert real["ed_es_change"] == pytest.approx(np.mean([np.abs(p.image[:, :, :p.n_slices, p.es]
                                                                 - p.image[:, :, :p.n_slices, p.ed]).mean() for p in preps]))
    fakes = [prepare_subject(ref.load(), grid) for ref in scan(fake_set[0]).refs]
    assert gen["ed_es_change"] == pytest.approx(np.mean([np.abs(f.image[..., :f.n_slices, 1] - f.image[..., :f.n_slices, 0]).mean()
                                                         for f in fakes])) and gen["ed_es_change"] > 0
    # The fake generated set: ES (frame 1 of 3) from the LV curve, one component everywhere.
    assert gen["es_phase"] == pytest.approx(1 / 3) and gen["ed_offset"] == 0.0
    phases = [(s.es - s.ed) % s.n_frames / s.n_frames for s in subjects]
    assert real["es_phase_mad_sd"] == pytest.approx(es_phase_spread(phases)["es_phase_mad_sd"])
    assert gen["one_component"] == {"RV": 1.0, "MYO": 1.0, "LV": 1.0}


# ---- reconstruction and FVD ----------------------------------------------------------------

def test_reconstruction_with_a_tiny_vae(small_phantom, tiny_vae):
    r = evaluate(small_phantom, None, recon=True, weights=tiny_vae)["recon"]
    frames = sum(ref.load().n_frames for ref in scan(small_phantom).refs)
    assert r["frames"] == frames and np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    for kind in ("labelled", "unlabelled"):          # the phantom's full-cycle masks label the other frames
        for s in ("RV", "MYO", "LV"):
            assert 0 <= r["masks"][kind][s]["dice"] <= 1
    assert r["masks"]["labelled"]["LV"]["frames"] == 2 * len(scan(small_phantom).refs)
    assert r["masks"]["unlabelled"]["LV"]["frames"] == frames - 2 * len(scan(small_phantom).refs)
    # EF of the decoded ED/ES masks against the true ones, checked here from the source masks on the same grid
    vae_meta = load_vae(tiny_vae / "vae.safetensors", "cpu")[1]
    true = [clinical_measures(p.masks[p.ed][..., :p.n_slices], p.masks[p.es][..., :p.n_slices], p.spacing)
            for p in (prepare_subject(ref.load(), vae_meta["grid"]) for ref in scan(small_phantom).refs)]
    assert r["ef"]["subjects"] == len(true)
    for name in ("lvef", "rvef"):
        assert r["ef"][name]["true_mean"] == pytest.approx(np.mean([m[name] for m in true]))
        e = r["ef"][name]
        if e["undefined"] == 0:     # a tiny VAE's decoded ED mask may lack a cavity: no EF, counted apart
            assert e["bias"] == pytest.approx(e["decoded_mean"] - e["true_mean"])
            assert e["mae"] >= abs(e["bias"]) - 1e-9
        else:
            assert e["undefined"] <= len(true)


def test_reconstruction_image_change(small_phantom, tiny_vae, monkeypatch):
    """How much motion survives the VAE: a decoder that keeps every frame scores the real change, one that
    freezes the cycle at frame 0 scores none; the real figures are the numpy mean |frame t+1 - frame t| and
    mean |ES frame - ED frame|."""
    import synth4d.jobs.evaluate as ev
    real_frames = ev.reconstruct_frames
    grid = load_vae(tiny_vae / "vae.safetensors", "cpu")[1]["grid"]
    preps = [prepare_subject(ref.load(), grid) for ref in scan(small_phantom).refs]
    want = np.mean([np.mean([np.abs(p.image[:, :, :p.n_slices, (t + 1) % p.image.shape[3]]
                                    - p.image[:, :, :p.n_slices, t]).mean() for t in range(p.image.shape[3])])
                    for p in preps])
    want_es = np.mean([np.abs(p.image[:, :, :p.n_slices, p.es] - p.image[:, :, :p.n_slices, p.ed]).mean() for p in preps])
    for name, frame in (("perfect", lambda p, t: p.image[:, :, :p.n_slices, t]),
                        ("frozen", lambda p, t: p.image[:, :, :p.n_slices, 0])):
        def fake(model, p, device, frames=None, frame=frame):
            for t, _, pred, truth, kind in real_frames(model, p, device, frames):
                yield t, frame(p, t), pred, truth, kind
        monkeypatch.setattr(ev, "reconstruct_frames", fake)
        r = evaluate(small_phantom, None, recon=True, weights=tiny_vae)["recon"]
        c, e = r["image_change"], r["ed_es_change"]
        assert c["real"] == pytest.approx(want, rel=1e-6) and want > 0
        assert c["decoded"] == (pytest.approx(want, rel=1e-6) if name == "perfect" else 0.0)
        assert e["real"] == pytest.approx(want_es, rel=1e-6) and want_es > 0
        assert e["decoded"] == (pytest.approx(want_es, rel=1e-6) if name == "perfect" else 0.0)


def test_fvd_vae_and_errors(small_phantom, fake_set, tiny_vae, tmp_path):
    result = evaluate(small_phantom, fake_set[0], fvd=True, weights=tiny_vae)
    assert "fvd" not in result
    r = result["fvd_vae"]
    assert r["value"] > 0 and r["real_halves"] is not None and r["protocol"]["feature"].startswith("NOT FVD")
    assert r["protocol"]["clips"]["generated"] == len(FAKE) * Z and r["protocol"]["frames"] == 16
    with pytest.raises(UserError, match="VAE"):
        evaluate(small_phantom, fake_set[0], fvd=True, weights=tmp_path)
    with pytest.raises(UserError, match="manifest"):
        evaluate(small_phantom, small_phantom, control=True)
    with pytest.raises(UserError, match="REAL"):
        evaluate(None, fake_set[0])


def test_i3d_fvd_of_a_set_with_itself_is_zero(fake_set):
    torch.manual_seed(0)
    features = I3DFeatures(InceptionI3d().eval(), "state_dict", "cpu")
    ds = scan(fake_set[0])
    ds = dataclasses.replace(ds, refs=ds.refs[:2])
    r = fvd_report(ds, ds, GridConfig(spacing=PX, size=N, slices=Z), i3d_features=features, i3d_path="random", size=32)
    assert r["value"] == pytest.approx(0.0, abs=1e-6 * r["real_halves"]) and r["real_halves"] > 0
    assert r["protocol"]["resolution"] == [32, 32] and r["protocol"]["clips"] == {"real": 2 * Z, "generated": 2 * Z}


# ---- the command line ----------------------------------------------------------------------

def test_cli_json_on_stdout_table_on_stderr(tiny_phantom, fake_set):
    args = ["eval", str(tiny_phantom), str(fake_set[0]), "--control", "--coherence", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"real", "generated", "control", "coherence"}
    assert report["control"]["diagnosis"]["n"] == 3
    assert "controllability" in result.stderr and "temporal coherence" in result.stderr
    # Without --json the table is the data: on stdout, so `synth4d eval a b --control > table.txt` keeps it.
    result = CliRunner().invoke(cli, args[:-1])
    assert result.exit_code == 0 and "diagnosis criteria met" in result.stdout and "criteria met" not in result.stderr


def test_eval_end_to_end_on_generated_subjects(tiny_phantom, tiny_weights, tmp_path):
    """generate -> eval through the CLI: every default metric on a real generated set."""
    import json

    from tests.conftest import run_cli
    out = tmp_path / "gen"
    run_cli("generate", "--weights", tiny_weights, "--n", 4, "--frames", 6, "--steps", 3, out)
    result = run_cli("eval", tiny_phantom, out, "--weights", tiny_weights, "--json")
    report = json.loads(result.stdout)
    assert {"fvd_vae", "control", "coherence", "recon", "agreement"} <= set(report)
    assert report["agreement"]["frames"] == 4 * 6 and all(0 <= d <= 1 for d in report["agreement"]["dice"].values())
    assert "fvd" not in report  # without I3D weights the VAE-feature distance must not be called FVD
    assert report["fvd_vae"]["value"] >= 0 and report["fvd_vae"]["real_halves"] >= 0
    lvedv = report["control"]["priors"]["lvedv"]
    assert lvedv["n"] == 4 and -1 <= lvedv["r"] <= 1 and lvedv["mae"] >= 0


def test_image_mask_agreement_scores_the_pairing(tiny_vae, tmp_path, monkeypatch):
    """A stand-in mask head that reads labels off the intensities agrees with the right masks, not with swapped ones."""
    import synth4d.jobs.evaluate
    geom = nifti.Geometry.from_spacing((PX, PX, SLICE), frame_ms=300.0)
    subjects = [_fake_subject(radii, lengths)[1] for _, radii, lengths in FAKE[:2]]
    for name, masks in (("right", subjects), ("swapped", subjects[::-1])):
        for i, (mask, paired) in enumerate(zip(subjects, masks)):
            nifti.write(tmp_path / name / f"synth_{i:04d}.nii.gz", mask.astype(np.int16) * 300, geom)
            nifti.write(tmp_path / name / f"synth_{i:04d}_mask.nii.gz", paired, geom, kind="mask")

    def labels_from_intensity(model, image, device):  # image on the grid in [-1, 1]: label l was -1 + 2 l / 3
        labels = np.clip(np.rint((image + 1) * 1.5), 0, 3).astype(int)
        return image, np.moveaxis(np.eye(4, dtype=np.float32)[labels], -1, 0)  # (C, X, Y, Z, T)

    monkeypatch.setattr(synth4d.jobs.evaluate, "reconstruct", labels_from_intensity)
    right = evaluate(tmp_path / "right", tmp_path / "right", agreement=True, weights=tiny_vae)["agreement"]
    swapped = evaluate(tmp_path / "right", tmp_path / "swapped", agreement=True, weights=tiny_vae)["agreement"]
    assert right["subjects"] == 2 and right["frames"] == 2 * 3
    # The tiny grid (6 mm) blurs the 5-px RV box and the 3-px ring through resampling there and back.
    assert right["dice"]["LV"] > 0.9 and right["dice"]["MYO"] > 0.7 and right["dice"]["RV"] > 0.4, right
    assert swapped["dice"]["LV"] < right["dice"]["LV"] - 0.15 and swapped["dice"]["MYO"] < right["dice"]["MYO"] - 0.15


@pytest.mark.parametrize("content, why", [
    (b"id,requested_lvedv\nsynth_0000,abc\n", "line 2: requested_lvedv 'abc' is not a finite number"),
    (b"id,requested_lvedv\nsynth_0000,nan\n", "line 2: requested_lvedv 'nan' is not a finite number"),
    ("id,requested_lvedv\nsynth_0000,1\n".encode("utf-16"), "unreadable manifest"),
    (b'id,requested_lvedv\n"synth_0000,1\n', "unreadable manifest"),
    (b"name\nx\n", "not a synth4d manifest"),
])
def test_malformed_manifests_are_refused_naming_the_file(tmp_path, content, why):
    from synth4d.cine import DataError
    (tmp_path / "manifest.csv").write_bytes(content)
    with pytest.raises(DataError, match=why) as info:
        _manifest(tmp_path)
    assert info.value.path == str(tmp_path / "manifest.csv")
