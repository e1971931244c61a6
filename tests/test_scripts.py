"""The measuring scripts in scripts/ (not part of the package): the parts whose mistakes would silently
change a published figure."""
import csv
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import weights_without_es_prior

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(cmd):
    """`--flag value` pairs of a command line -> {flag: value}."""
    return {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}


def test_generate_options_per_model():
    table = load("sampler_table")
    assert options(table.generate_options("ddim/dpmpp_2m:25/8:12:0")) == {
        "--sampler": "ddim", "--steps": "25", "--keyframes": "12", "--seed": "0", "--precision": "auto",
        "--motion-sampler": "dpmpp_2m", "--motion-steps": "8"}
    single = options(table.generate_options("dpmpp_2m:10:8:1:fp32"))
    assert single == {"--sampler": "dpmpp_2m", "--steps": "10", "--keyframes": "8", "--seed": "1", "--precision": "fp32"}
    guided = options(table.generate_options("ddim/dpmpp_2m:25/8:12:0:auto:0.5/0.25"))
    assert (guided["--guided-fraction"], guided["--motion-guided-fraction"]) == ("0.5", "0.25")
    both = options(table.generate_options("ddim:25:12:1:bf16:0.4"))
    assert (both["--precision"], both["--guided-fraction"], both["--motion-guided-fraction"]) == ("bf16", "0.4", "0.4")
    assert "--motion-final-t" not in both
    assert options(table.generate_options("ddim/dpmpp_2m:25/8:12:0:auto:0.5/0.25:20"))["--motion-final-t"] == "20"


def test_guided_fraction_options_sample_the_default(tmp_path, monkeypatch):
    """The default sampling written out in sampler_table's fields resolves, through the CLI's own parsing, to
    exactly what `synth4d generate` samples with no sampling options (so its rows measure the default)."""
    from click.testing import CliRunner
    from synth4d import synth4d
    from synth4d.jobs import generate as gen
    from synth4d.jobs.synthesize import Sampling
    table = load("sampler_table")
    seen = []
    monkeypatch.setattr(gen, "generate", lambda out, **kw: seen.append(kw) or [])
    for opts in ([], table.generate_options("ddim/unipc:25/8:12:0:auto:0.5/0.25:20"),
                 table.generate_options("ddim:25:12:0"), table.generate_options("ddim/dpmpp_2m:25/8:12:0:auto:0.5/0.25:20")):
        result = CliRunner().invoke(synth4d.cli, ["generate", str(tmp_path / "out"), *opts])
        assert result.exit_code == 0, result.output
    fields = ("sampler", "steps", "guidance", "keyframes", "motion_sampler", "motion_steps", "motion_guidance",
              "guided_fraction", "motion_guided_fraction", "motion_final_t")
    default, written, ddim, previous = (Sampling(**{k: kw[k] for k in fields}) for kw in seen)
    assert default == written and default.chain_args()["guided_steps"] == 12 and default.motion_sampler == "unipc"
    assert default.motion_final_t == 20 and previous != default   # the previous default: DPM-Solver++(2M), same grid
    assert dataclasses.replace(previous, motion_sampler="unipc") == default
    assert ddim != default and ddim.chain_args()["motion_guided_steps"] == 25   # no fraction: every step guided
    assert ddim.motion_final_t is None


def test_every_job_samples_the_same_way(tmp_path, monkeypatch):
    """Each generation job of a setting gets the same sampler options (a regression: the second job of a
    STATIC/MOTION setting once lost its motion sampler and ran the default)."""
    table = load("sampler_table")
    commands = []

    class FakeProcess:
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(table.subprocess, "Popen", FakeProcess)
    out = tmp_path / "setting"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps({"fvd_vae": 1.0}))   # evaluation is not what this test checks
    result = table.run_setting(tmp_path / "real", out, "ddim/dpmpp_2m:25/4:8:3", n=10, jobs=3, weights=None)
    assert len(commands) == 3
    assert [options(c)["--start"] for c in commands] == ["0", "4", "8"]
    for cmd in commands:
        o = options(cmd)
        assert (o["--sampler"], o["--steps"], o["--motion-sampler"], o["--motion-steps"], o["--keyframes"], o["--seed"]) == (
            "ddim", "25", "dpmpp_2m", "4", "8", "3")
    rows = [(out / f"requests_{j}.csv").read_text().split()[1:] for j in range(3)]
    assert [len(r) for r in rows] == [4, 4, 2] and rows[1][0] == table.DIAGNOSES[4 % len(table.DIAGNOSES)]
    assert result["timing"]["subjects"] == 10 and result["fvd_vae"] == 1.0


def test_one_setting_prints_its_row(tmp_path, monkeypatch, capsys):
    """A single setting (no seed pair to measure noise with, nothing to pair with) prints its row and ends
    cleanly (a regression: it once failed unpacking a second setting after printing the table)."""
    table = load("sampler_table")
    monkeypatch.setattr(table, "run_setting", lambda real, out, setting, n, jobs, weights: {"setting": setting})
    monkeypatch.setattr(table, "row", lambda setting, r: f"| {r['setting']} |")
    monkeypatch.setattr(sys, "argv", ["sampler_table.py", str(tmp_path / "real"), str(tmp_path / "runs"),
                                      "--settings", "ddim/dpmpp_2m:25/8:12:0"])
    table.main()
    assert capsys.readouterr().out.strip().splitlines()[-1] == "| ddim/dpmpp_2m:25/8:12:0 |"


def test_each_setting_is_paired_with_the_first_of_its_seed(tmp_path, monkeypatch, capsys):
    """Paired comparisons set each setting against the first setting listed with the same seed (same requests),
    never a seed-1 row against a seed-0 one."""
    import synth4d.weights.checkpoint as checkpoint
    table = load("sampler_table")
    monkeypatch.setattr(table, "run_setting", lambda real, out, setting, n, jobs, weights: {"setting": setting})
    monkeypatch.setattr(table, "row", lambda setting, r: f"| {r['setting']} |")
    monkeypatch.setattr(table, "beyond_noise", lambda results, reference, repeat: {})
    monkeypatch.setattr(checkpoint, "load_vae", lambda path, device: (None, {"grid": None}))
    monkeypatch.setattr(table, "per_subject", lambda folder, grid: folder.name)
    pairs = []
    monkeypatch.setattr(table, "paired", lambda a, b: pairs.append((a, b)) or {})
    settings = ["ddim:25:12:0", "ddim:25:12:1", "ddim/dpmpp_2m:25/8:12:0", "ddim/dpmpp_2m:25/8:12:1",
                "ddim/dpmpp_2m:25/8:12:2"]
    monkeypatch.setattr(sys, "argv", ["sampler_table.py", str(tmp_path / "real"), str(tmp_path / "runs"),
                                      "--settings", *settings])
    table.main()
    assert pairs == [("ddim_25_12_0", "ddim-dpmpp_2m_25-8_12_0"), ("ddim_25_12_1", "ddim-dpmpp_2m_25-8_12_1")]
    assert capsys.readouterr().out.count("paired with") == 2


def test_beyond_noise_compares_each_row_with_the_reference_of_its_seed(monkeypatch):
    """A seed-1 row is set against the reference's seed-1 run (the same requests), not its seed-0 one."""
    table = load("sampler_table")
    monkeypatch.setattr(table, "judged", lambda r: r)
    results = {"ddim:25:12:0": {"lvef r": 0.90, "fvd_vae": 1.0}, "ddim:25:12:1": {"lvef r": 0.92, "fvd_vae": 1.0},
               "x:8:12:0": {"lvef r": 0.89, "fvd_vae": 1.5}, "x:8:12:1": {"lvef r": 0.93, "fvd_vae": 0.5}}
    moved = table.beyond_noise(results, "ddim:25:12:0", "ddim:25:12:1")
    # noise: 0.02 in lvef r, 0 in fvd_vae; seed 1's row is 0.01 above its own reference (0.03 above seed 0's)
    assert moved == {"x:8:12:0": {"worse": ["fvd_vae"], "better": []}, "x:8:12:1": {"worse": [], "better": ["fvd_vae"]}}


def test_es_phase_prior_added_to_older_weights(tiny_weights, tiny_phantom, tmp_path, monkeypatch):
    """scripts/es_phase_prior.py gives a static checkpoint from before the ES phase prior the prior training
    now fits, with the anchor measured on a generated folder, and keeps its tensors."""
    runs = tiny_weights.parent
    old = tmp_path / "old"
    meta, tensors, trained = weights_without_es_prior(tiny_weights, old)
    gen = tmp_path / "gen"
    gen.mkdir()
    with open(gen / "manifest.csv", "w", newline="") as f:   # ES at frames 10, 10, 11 of 30; one implausible
        w = csv.writer(f)
        w.writerow(["id", "plausible", "es", "frames", "es_phase"])
        w.writerows([["a", "yes", 10, 30, ""], ["b", "yes", 10, 30, ""], ["c", "yes", 11, 30, ""], ["d", "no LV", 29, 30, ""]])
    script = load("es_phase_prior")
    args = [str(tiny_phantom), str(runs / "static"), str(old), "--anchor-from", str(gen), "--cache", str(runs / "cache")]
    monkeypatch.setattr(sys, "argv", ["es_phase_prior.py", *args])
    script.main()
    with safe_open(str(old / "static.safetensors"), framework="pt") as f:
        got = json.loads(f.metadata()["priors"])
        assert all(f.get_tensor(k).equal(v) for k, v in tensors.items())
    assert got["es_phase"]["anchor"] == 10 / 30 and got["es_phase"]["anchor_measured_on"] == 3
    assert got["es_phase"]["all"] == trained["es_phase"]["all"] and got["dx"] == trained["dx"]
    # A checkpoint whose measure prior other data gave is refused, and left as it was.
    meta["priors"] = json.dumps({**json.loads(meta["priors"]), "all": {**trained["all"], "n": 999}})
    save_file(tensors, str(old / "static.safetensors"), metadata=meta)
    before = (old / "static.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="not the one these training subjects give"):
        script.main()
    assert (old / "static.safetensors").read_bytes() == before


def test_paired_differences_against_numpy():
    """paired(): the full-sample difference of each figure, and an interval that excludes 0 for a shift every
    subject shares and includes it for pure noise."""
    import numpy as np
    table = load("sampler_table")
    rng = np.random.default_rng(0)
    a, b, c = {}, {}, {}
    for i in range(60):
        base = {f"requested {k}": float(rng.uniform(30, 200)) for k in table.MEASURES}
        measured = {f"measured {k}": base[f"requested {k}"] + float(rng.normal(0, 10)) for k in table.MEASURES}
        change, detail = float(rng.uniform(0.01, 0.02)), float(rng.uniform(0.001, 0.003))
        a[f"s{i}"] = {**base, **measured, "image change": change, "hf energy": detail}
        b[f"s{i}"] = {**base, **measured, "image change": change - 0.0005,             # less motion and detail,
                      "hf energy": 0.9 * detail}                                      # all else equal
        c[f"s{i}"] = {**base, **{k: v + float(rng.normal(0, 10)) for k, v in measured.items()}, "image change": change,
                      "hf energy": detail}
    d = table.paired(a, b, boot=500)
    assert d["image change"][0] == pytest.approx(-0.0005) and d["image change"][2] < 0              # excludes 0
    assert d["hf energy"][0] == pytest.approx(-0.1 * np.mean([a[i]["hf energy"] for i in a])) and d["hf energy"][2] < 0
    assert all(d[f"{k} r"] == (0.0, 0.0, 0.0) for k in table.MEASURES)
    e = table.paired(a, c, boot=500)
    ids = sorted(a)
    req = [a[i]["requested lvef"] for i in ids]
    assert e["lvef r"][0] == pytest.approx(np.corrcoef(req, [c[i]["measured lvef"] for i in ids])[0, 1]
                                           - np.corrcoef(req, [a[i]["measured lvef"] for i in ids])[0, 1])
    assert e["lvef mae"][1] < e["lvef mae"][0] < e["lvef mae"][2] and e["image change"] == (0.0, 0.0, 0.0)


def test_heart_detail_is_the_realism_sharpness_per_subject():
    """heart_detail(): the mean over labelled frames of the high-frequency energy in the heart's box, as `eval
    --realism` scores a frame (a numpy high-pass here), and a blurred copy of a cycle has less of it."""
    import types
    import numpy as np
    from scipy.ndimage import gaussian_filter
    table = load("sampler_table")
    rng = np.random.default_rng(0)
    X, Z, T, n = 40, 6, 3, 4
    image = rng.uniform(-1, 1, (X, X, Z, T)).astype(np.float32)
    mask = np.zeros((X, X, Z, T), np.uint8)
    mask[15:25, 12:22, :n] = 2                                   # a 10 x 10 heart in every slice with data
    p = types.SimpleNamespace(image=image, full_mask=mask, masks={}, n_slices=n)
    m = 4                                                        # the 10 mm margin at 2.5 mm
    expected = []
    for t in range(T):
        x = image[:, :, :n, t].astype(np.float64)
        smooth = np.stack([gaussian_filter(x[:, :, k], 1.0, mode="nearest", truncate=50) for k in range(n)], -1)
        expected.append(((x - smooth)[15 - m: 25 + m, 12 - m: 22 + m] ** 2).mean())
    assert table.heart_detail(p, 2.5) == pytest.approx(np.mean(expected), rel=0.05)
    blurred = types.SimpleNamespace(image=gaussian_filter(image, (1, 1, 0, 0)), full_mask=mask, masks={}, n_slices=n)
    assert table.heart_detail(blurred, 2.5) < 0.5 * table.heart_detail(p, 2.5)
    ed_only = types.SimpleNamespace(image=image, full_mask=None, masks={1: mask[..., 1]}, n_slices=n)
    assert table.heart_detail(ed_only, 2.5) == pytest.approx(expected[1], rel=0.05)


def test_benchmark_settings_name_and_parse_back():
    """The benchmark's setting strings round-trip, the default's grid end included (so its rows time the default)."""
    from synth4d.jobs.synthesize import Sampling
    bench = load("benchmark")
    assert bench.setting_name(Sampling(), "auto") == "ddim/unipc:25/8:12:auto:2:0.5/0.25:20"
    for sampling, precision in ((Sampling(), "auto"), (Sampling("ddim", 25), "fp32"),
                                (Sampling("ddim", 25, motion_sampler="dpmpp_2m", motion_steps=8), "bf16"),
                                (Sampling("ddim", 25, motion_final_t=60), "auto")):
        name = bench.setting_name(sampling, precision)
        assert bench.parse_setting(name) == (sampling, precision), name
    assert bench.parse_setting("ddim/dpmpp_2m:25/8:12:auto:2:0.5/0.25")[0].motion_final_t is None   # trailing
    previous = bench.parse_setting("ddim/dpmpp_2m:25/8:12:auto:2:0.5/0.25:20")[0]         # the previous default
    assert (previous.motion_sampler, previous.motion_final_t) == ("dpmpp_2m", 20)
