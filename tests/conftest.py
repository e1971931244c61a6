"""Shared fixtures: a tiny phantom data set and tiny trained weights for all three stages.

Both are built once per test session with the `tiny` preset, through the real CLI, so every
test that generates or evaluates runs the whole chain end to end on the CPU in seconds.
"""
import shutil

import pytest
from click.testing import CliRunner

from synth4d import cli


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    from synth4d.cine.phantom import write_phantom
    root = tmp_path_factory.mktemp("phantom")
    list(write_phantom(root, n=6, seed=0, frames=6, matrix=48, progress=False))
    return root


def run_cli(*args):
    """Invoke the CLI in-process; fail the test with its output when it does not exit 0."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def tiny_weights(tiny_phantom, tmp_path_factory):
    """A folder with vae/static/motion .safetensors trained for a few steps on the tiny phantom."""
    runs = tmp_path_factory.mktemp("runs")
    cache = runs / "cache"
    common = ["--preset", "tiny", "--cache", cache]
    run_cli("train-vae", tiny_phantom, "--out", runs / "vae", "--steps", 6, "--eval-every", 6, *common)
    vae = runs / "vae" / "vae.safetensors"
    run_cli("train-static", tiny_phantom, "--vae", vae, "--out", runs / "static", "--steps", 4, *common)
    run_cli("train-motion", tiny_phantom, "--vae", vae, "--out", runs / "motion", "--steps", 4, *common)
    folder = runs / "weights"
    folder.mkdir()
    for stage in ("vae", "static", "motion"):
        shutil.copy(runs / stage / f"{stage}.safetensors", folder / f"{stage}.safetensors")
    return folder


def weights_without_es_prior(weights, folder):
    """A copy of `weights` in `folder` whose static checkpoint lacks the ES phase prior, as checkpoints
    trained before it do -> (static metadata, static tensors, the original priors)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder.mkdir()
    for stage in ("vae", "motion"):
        (folder / f"{stage}.safetensors").write_bytes((weights / f"{stage}.safetensors").read_bytes())
    with safe_open(str(weights / "static.safetensors"), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    priors = json.loads(meta["priors"])
    meta["priors"] = json.dumps({k: v for k, v in priors.items() if k != "es_phase"})
    save_file(tensors, str(folder / "static.safetensors"), metadata=meta)
    return meta, tensors, priors


def fails_at(k, real, error):
    """`real` wrapped to raise `error` on its k-th call (1-based) and behave as itself otherwise."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise error
        return real(*args, **kwargs)
    return wrapped


def interrupt_each_write(train, modules, monkeypatch, tmp_path, contents, expected) -> int:
    """Run train(out) with its k-th atomic write interrupted (KeyboardInterrupt), for k = 1, 2, ... until a
    run finishes uninterrupted; after each interruption train(out, resume=True) (or train(out) when
    nothing was written to resume) must leave contents(out) == expected. Returns the k that finished,
    one more than the number of atomic writes of a run."""
    import synth4d.cine
    from synth4d.cine import UserError
    real, k = synth4d.cine.atomic_write, 0
    while True:
        k += 1
        out = tmp_path / f"fault{k}"
        faulty = fails_at(k, real, KeyboardInterrupt)   # one count over every module's writes
        for m in modules:
            monkeypatch.setattr(m, "atomic_write", faulty)
        try:
            train(out)
            finished = True
        except KeyboardInterrupt:
            finished = False
        for m in modules:
            monkeypatch.setattr(m, "atomic_write", real)
        if finished:
            return k
        try:
            train(out, resume=True)
        except UserError:   # nothing written yet: start it
            train(out)
        assert contents(out) == expected, k
