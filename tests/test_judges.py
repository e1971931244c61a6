"""The compact segmenter and the figures it judges with: realism and sharpness, the downstream arms,
memorisation; and the math under them (high-frequency energy, the paired permutation test)."""
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from synth4d import cli
from synth4d.cine import UserError, nifti
from synth4d.cine.datasets import scan
from synth4d.cine.metrics import high_frequency_energy, paired_permutation_p
from synth4d.cine.phantom import write_phantom
from synth4d.cine.prep import prepare_subject
from synth4d.jobs.compact import FitSettings, collect, fit, predict
from synth4d.jobs.downstream import downstream
from synth4d.jobs.evaluate import evaluate
from synth4d.jobs.realism import judge_grid, realism
from synth4d.nets.config import GridConfig
from synth4d.nets.segmenter import Segmenter2D
from tests.conftest import run_cli

# ---- math ------------------------------------------------------------------------------------


def test_high_frequency_energy_matches_a_direct_convolution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 10, 3))
    region = np.zeros(x.shape, bool)
    region[2:9, 3:8] = True
    sigma = 1.3
    ref = np.empty_like(x)            # edge-renormalised Gaussian, written out voxel by voxel
    for i, j in itertools.product(range(12), range(10)):
        w = np.exp(-0.5 * ((np.arange(12)[:, None] - i) ** 2 + (np.arange(10)[None, :] - j) ** 2) / sigma ** 2)
        ref[i, j] = np.einsum("xy,xyz->z", w / w.sum(), x)
    assert high_frequency_energy(x, region, sigma) == pytest.approx(((x - ref)[region] ** 2).mean(), rel=1e-10)


def test_high_frequency_energy_drops_with_blur_and_ignores_constants():
    x = np.random.default_rng(1).normal(size=(32, 32, 2))
    region = np.ones(x.shape, bool)
    blurred = ndimage.gaussian_filter(x, (1.5, 1.5, 0))
    assert high_frequency_energy(blurred, region) < 0.2 * high_frequency_energy(x, region)
    assert high_frequency_energy(np.full((8, 8), 3.0), np.ones((8, 8), bool)) == pytest.approx(0.0, abs=1e-20)
    assert np.isnan(high_frequency_energy(x, np.zeros(x.shape, bool)))


def test_paired_permutation_p_is_the_exact_enumeration():
    d = np.array([0.3, -0.1, 0.25, 0.05, 0.4, -0.02])
    stats = [abs(np.mean(d * s)) for s in itertools.product((-1, 1), repeat=len(d))]
    expected = np.mean([s >= abs(d.mean()) - 1e-12 for s in stats])
    assert paired_permutation_p(d) == pytest.approx(expected)
    assert paired_permutation_p(np.full(5, 0.1)) == pytest.approx(2 / 32)   # all one sign: the two extremes
    assert paired_permutation_p(np.zeros(4)) == 1.0
    big = np.random.default_rng(0).normal(0.5, 1.0, size=40)              # Monte Carlo branch
    assert paired_permutation_p(big, seed=3) == paired_permutation_p(big, seed=3) < 0.01
    assert paired_permutation_p(np.random.default_rng(1).normal(0, 1, 40)) > 0.05


# ---- the compact segmenter -------------------------------------------------------------------

@pytest.fixture(scope="module")
def slices(tiny_phantom):
    grid = judge_grid(2.0, 40)
    return collect(prepare_subject(r.load(), grid) for r in scan(tiny_phantom).refs)


def test_fit_is_reproducible_by_seed_and_learns(slices):
    settings = FitSettings(steps=40, batch=8, width=8)
    a, b = fit(slices, settings), fit(slices, settings)
    c = fit(slices, FitSettings(steps=40, batch=8, width=8, seed=1))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    state = torch.random.get_rng_state()
    fit(slices, FitSettings(steps=2, batch=4, width=8))
    assert torch.equal(state, torch.random.get_rng_state())        # the caller's random state is left alone
    prob = predict(a, np.moveaxis(slices.images[:5], 0, 2))
    assert prob.shape == (4, 40, 40, 5) and np.allclose(prob.sum(axis=0), 1, atol=1e-5)


def test_segmenter_refuses_sizes_its_poolings_cannot_halve():
    with pytest.raises(ValueError, match="multiple of 8"):
        Segmenter2D(width=8)(torch.zeros(1, 1, 36, 40))


# ---- realism ---------------------------------------------------------------------------------

def _copy(src, dst, blur=0.0):
    """A copy of an ACDC-layout set, its 4D images blurred in-plane by `blur` voxels (std)."""
    shutil.copytree(src, dst)
    if blur:
        for path in dst.glob("*/*_4d.nii.gz"):
            image, geom = nifti.read(path, ndim=4)
            nifti.write(path, ndimage.gaussian_filter(image, (blur, blur, 0, 0)), geom)
    return dst


@pytest.fixture(scope="module")
def copies(tiny_phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("copies")
    return _copy(tiny_phantom, root / "sharp"), _copy(tiny_phantom, root / "blurred", blur=1.5)


def test_realism_scores_a_blurred_copy_lower_and_repeats_exactly(tiny_phantom, copies):
    sharp, blurred = copies
    settings = FitSettings(steps=150, batch=8, width=8)
    grid = GridConfig(2.0, 40, 32)
    real = scan(tiny_phantom)
    a = realism(real, scan(sharp), grid, settings)
    b = realism(real, scan(blurred), grid, settings)
    assert a == realism(real, scan(sharp), grid, settings)               # same seed, same figures
    assert a["rows"]["real"]["realism"] == {"RV": 1.0, "MYO": 1.0, "LV": 1.0}
    assert b["rows"]["generated"]["sharpness"] < 0.5 * a["rows"]["generated"]["sharpness"]
    gen_a, gen_b = a["rows"]["generated"]["dice"], b["rows"]["generated"]["dice"]
    assert np.mean(list(gen_b.values())) < np.mean(list(gen_a.values())) - 0.02, (gen_a, gen_b)


def test_round_trips_on_another_grid_keep_their_geometry(tiny_phantom, monkeypatch):
    """A perfect VAE (its round trip is its input) on a grid other than the judge's: brought back to the
    judge's grid, its frames score as the real ones do (alignment kept); one linear resampling costs some
    sharpness, and the same VAE on the judge's own grid keeps it all."""
    import synth4d.jobs.realism as jr

    def perfect(vae, p, device, frames):
        n = p.n_slices
        for t in frames:
            truth = p.masks[t][:, :, :n] if t in p.masks else p.full_mask[:, :, :n, t]
            yield t, p.image[:, :, :n, t], None, truth, None
    monkeypatch.setattr(jr, "reconstruct_frames", perfect)
    settings = FitSettings(steps=150, batch=8, width=8)
    grid = GridConfig(2.0, 40, 32)
    r = realism(scan(tiny_phantom), None, grid, settings, vae=(None, {"grid": GridConfig(2.0, 48, 12)}))
    assert "grid's loss" in r["note"]
    real, rec = r["rows"]["real"], r["rows"]["reconstructed"]
    assert rec["frames"] == real["frames"]
    for s in ("RV", "MYO", "LV"):
        assert rec["dice"][s] == pytest.approx(real["dice"][s], abs=0.03), s
    assert 0.5 < rec["sharpness"] <= 1.0
    same = realism(scan(tiny_phantom), None, grid, settings, vae=(None, {"grid": GridConfig(2.0, 40, 12)}))
    assert same["note"] is None and same["rows"]["reconstructed"]["sharpness"] == pytest.approx(1.0)
    assert same["rows"]["reconstructed"]["dice"] == pytest.approx(real["dice"])


def test_realism_through_the_cli_with_the_reconstructed_row(tiny_phantom, tiny_weights, copies, tmp_path):
    out = run_cli("eval", tiny_phantom, copies[0], "--realism", "--seg-steps", 3, "--weights", tiny_weights,
                  "--json").stdout
    r = json.loads(out)["realism"]
    assert set(r["rows"]) <= {"real", "reconstructed", "generated"} and r["judge"]["fit"]["steps"] == 3
    assert set(r["rows"]) == {"real", "reconstructed", "generated"}
    same = r["grid"]["spacing"] == 6.0 and r["grid"]["size"] == 24    # the tiny VAE's grid
    assert bool(r["note"]) != same                   # another grid: the round trips are resampled, and it says so


def test_realism_without_a_generated_set_scores_round_trips(tiny_phantom, tiny_weights):
    r = json.loads(run_cli("eval", tiny_phantom, "--realism", "--seg-steps", 3, "--weights", tiny_weights,
                           "--json").stdout)["realism"]
    assert set(r["rows"]) == {"real", "reconstructed"} and r["grid"]["spacing"] == 1.5   # --seg-spacing's default
    assert "grid's loss" in r["note"]          # the tiny VAE's 6 mm round trips, scored on the 1.5 mm judge grid
    assert all(0 <= v <= 1 for v in r["rows"]["reconstructed"]["dice"].values() if v is not None)
    assert r["rows"]["reconstructed"]["frames"] == r["rows"]["real"]["frames"]
    with pytest.raises(UserError, match="GENERATED set, or a VAE"):
        evaluate(tiny_phantom, None, realism=True, weights=tiny_phantom)


# ---- downstream ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("target")
    list(write_phantom(root, n=2, seed=7, frames=4, matrix=48, vendor="C", progress=False))
    return root


def test_downstream_end_to_end_reproducible(tiny_phantom, copies, target):
    settings = FitSettings(steps=4, batch=4, width=8)
    args = dict(ratio=0.5, seeds=(0, 1), settings=settings, grid=judge_grid(2.0, 40))
    a = downstream(scan(tiny_phantom), scan(target), scan(copies[1]), **args)
    assert a == downstream(scan(tiny_phantom), scan(target), scan(copies[1]), **args)
    assert set(a["arms"]) == {"real", "real+synthetic"} and a["test"] == {"subjects": 2, "frames": 8,
                                                                         "path": str(target)}
    assert len(a["arms"]["real"]["LV"]["dice"]["per_seed"]) == 2
    diff = a["arms"]["real+synthetic"]["RV"]["dice"]["mean"] - a["arms"]["real"]["RV"]["dice"]["mean"]
    assert a["difference"]["RV"]["dice"] == pytest.approx(diff)
    assert 0 < a["paired_test"]["p"] <= 1 and "not nnU-Net" in a["segmenter"]
    alone = downstream(scan(tiny_phantom), scan(target), None, **args)
    assert set(alone["arms"]) == {"real"} and "difference" not in alone
    assert alone["arms"]["real"] == a["arms"]["real"]                 # the real arm does not depend on GEN


def test_downstream_cli_table_and_json(tiny_phantom, copies, target):
    result = CliRunner().invoke(cli, ["eval", "--downstream", "--train", str(tiny_phantom), "--synthetic",
                                      str(copies[1]), "--test", str(target), "--seeds", "1", "--seg-steps", "2",
                                      "--seg-size", "40", "--seg-spacing", "2", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["downstream"]
    assert d["settings"]["seeds"] == [0] and d["settings"]["grid"]["size"] == 40
    assert "p (paired)" in result.stderr and "not nnU-Net" in result.stderr


@pytest.mark.parametrize("case", ["overlap", "unlabelled", "empty", "missing"])
def test_downstream_bad_sets_one_line(tiny_phantom, target, tmp_path, case):
    train, test = tiny_phantom, target
    if case == "overlap":
        test = tmp_path / "mixed"
        test.mkdir()
        (test / "patient001").symlink_to(tiny_phantom / "patient001")   # the same files under another name
        expect = "shares"
    elif case == "unlabelled":
        train = tmp_path / "bare"
        for path in sorted(tiny_phantom.glob("*/*_4d.nii.gz"))[:2]:
            (train / path.parent.name).mkdir(parents=True)
            shutil.copy(path, train / path.parent.name / path.name)
            shutil.copy(path.parent / "Info.cfg", train / path.parent.name / "Info.cfg")
        expect = "no subject has a mask"
    elif case == "empty":
        test = tmp_path / "empty"
        test.mkdir()
        expect = "empty"
    else:
        test = None
        expect = "needs --train"
    argv = ["eval", "--downstream", "--train", str(train), "--seg-steps", "1"]
    argv += ["--test", str(test)] if test is not None else []
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code != 0
    message = str(result.exception)
    assert expect in message and "\n" not in message, message


# ---- memorisation ----------------------------------------------------------------------------

def test_memorisation_flags_a_copy_of_a_training_subject(tiny_phantom, tiny_weights, tmp_path):
    gen = tmp_path / "gen"
    list(write_phantom(gen, n=3, seed=11, frames=6, matrix=48, progress=False))
    shutil.copytree(tiny_phantom / "patient002", gen / "patient009")
    for path in (gen / "patient009").iterdir():
        path.rename(path.with_name(path.name.replace("patient002", "patient009")))
    out = run_cli("eval", tiny_phantom, gen, "--memorisation", "--weights", tiny_weights, "--json").stdout
    m = json.loads(out)["memorisation"]
    assert "patient009" in m["flagged"]["ids"]
    top = m["closest"][0]
    assert (top["generated"], top["train"]) == ("patient009", "patient002")
    assert top["distance"] == pytest.approx(0.0, abs=1e-6) and top["ed_mask_dice"] == pytest.approx(1.0)
    assert m["reference"] == "leave-one-out over TRAIN" and m["real_to_train"]["n"] == 6
    assert m["generated_to_train"]["n"] == 4


def test_memorisation_with_a_heldout_reference(tiny_phantom, tiny_weights, target, copies):
    out = run_cli("eval", tiny_phantom, copies[0], "--memorisation", "--heldout", target,
                  "--weights", tiny_weights, "--json").stdout
    m = json.loads(out)["memorisation"]
    assert m["flagged"]["fraction"] == 1.0 and m["real_to_train"]["n"] == 2   # every subject is a copy


def test_realism_needs_two_labelled_real_subjects(tiny_phantom, copies, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(tiny_phantom / "patient001", one / "patient001")
    with pytest.raises(UserError, match="at least 2 labelled"):
        realism(scan(one), scan(copies[0]), GridConfig(2.0, 40, 32), FitSettings(steps=1))
