"""Every training stage under data parallelism on the CPU: two gloo processes, launched as torchrun launches
them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), against one process with the same global batch.

Tolerance: the two runs differ only in how float32 sums are grouped (two half-batch gradient means averaged
by the all-reduce instead of one full-batch mean). After one step the weights agree to about 1e-7. Adam then
divides each gradient by its own running magnitude, so a parameter whose gradient is almost zero turns
rounding noise into updates up to the learning rate: the VAE's last mask-decoder bias differs by 4e-3 after
three steps between two single-process runs that differ only in their thread count (1 vs 2, measured).
So the VAE is compared after one step (1e-6), the diffusion stages, whose losses have no such parameter,
after three (measured differences about 1e-5; tolerance 1e-4, a tenth of one update at lr 1e-3).
Both runs compute in fp32: in bf16 a half batch rounds differently from a full one (3e-4 after one step).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = ["--batch-size", "4", "--lr", "1e-3", "--preset", "tiny", "--precision", "fp32"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, world=1, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        return [subprocess.run([sys.executable, "-m", "synth4d", *args], env=env, capture_output=True, text=True)]
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, "-m", "synth4d", *args], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.mark.parametrize("stage", ["vae", "static", "motion"])
def test_two_processes_equal_one(tiny_phantom, tiny_weights, tmp_path, stage):
    steps, tolerance = (1, 1e-6) if stage == "vae" else (3, 1e-4)
    vae = ["--vae", str(tiny_weights / "vae.safetensors")] if stage != "vae" else ["--eval-every", "1"]
    common = [f"train-{stage}", str(tiny_phantom), *vae, "--cache", str(tmp_path / "cache"), *STEPS,
              "--steps", str(steps)]
    one = _run(common + ["--out", str(tmp_path / "one")])
    assert one[0].returncode == 0, one[0].stderr[-2000:]
    two = _run(common + ["--out", str(tmp_path / "two")], world=2)
    assert all(r.returncode == 0 for r in two), [r.stderr[-2000:] for r in two]
    a = load_file(tmp_path / "one" / f"{stage}.safetensors")
    b = load_file(tmp_path / "two" / f"{stage}.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < tolerance, worst
    print(f"{stage}: largest weight difference {worst:.2e}")
    assert (tmp_path / "two" / "run.json").is_file() and "2 processes" in (tmp_path / "two" / "log.txt").read_text()


@pytest.mark.parametrize("stage", ["vae", "static", "motion"])
def test_two_processes_resume(tiny_phantom, tiny_weights, tmp_path, stage):
    vae = ["--vae", str(tiny_weights / "vae.safetensors")] if stage != "vae" else ["--eval-every", "2"]
    common = [f"train-{stage}", str(tiny_phantom), *vae, "--cache", str(tmp_path / "cache"),
              "--preset", "tiny", "--lr", "1e-3", "--batch-size", "4", "--out", str(tmp_path / "run")]
    first = _run(common + ["--steps", "2"], world=2)
    assert all(r.returncode == 0 for r in first), [r.stderr[-2000:] for r in first]
    again = _run(common + ["--steps", "4", "--resume"], world=2)
    assert all(r.returncode == 0 for r in again), [r.stderr[-2000:] for r in again]
    state = torch.load(tmp_path / "run" / f"{stage}.state.pt", weights_only=True)
    assert state["step"] == 4


def test_odd_batches_are_refused(tiny_phantom, tiny_weights, tmp_path):
    vae = tiny_weights / "vae.safetensors"
    odd = _run(["train-static", str(tiny_phantom), "--vae", str(vae), "--preset", "tiny", "--batch-size", "3",
                "--steps", "1", "--out", str(tmp_path / "odd")], world=2)
    assert all(r.returncode != 0 and "does not divide" in r.stderr for r in odd)


def test_each_rank_takes_its_own_slice(monkeypatch):
    from synth4d.train.common import Processes
    for rank in (0, 1, 2):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        p = Processes()
        assert p.part(12) == slice(4 * rank, 4 * rank + 4) and p.main == (rank == 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = Processes()
    assert single.part(12) == slice(0, 12) and single.wrap(torch.nn.Linear(1, 1), torch.device("cpu")).__class__ is torch.nn.Linear
