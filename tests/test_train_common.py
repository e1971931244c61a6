"""The shared training pieces: schedule, EMA, checkpoints, resume state, split, sampler, log."""
import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cine import DataError, UserError
from nets.config import get_preset
from train.common import (FrameSampler, RunLog, config_from_dict, load_checkpoint, load_state, lr_at, make_ema,
                          read_split, save_checkpoint, save_state, select_device, update_ema, write_split)


def test_lr_schedule():
    peak, warmup, total = 1e-3, 10, 110
    assert lr_at(0, peak, warmup, total) == pytest.approx(peak / warmup)
    assert lr_at(9, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(10, peak, warmup, total) == pytest.approx(peak)
    assert lr_at(60, peak, warmup, total) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr_at(110, peak, warmup, total) == pytest.approx(0.1 * peak)
    assert lr_at(500, peak, warmup, total) == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, peak, warmup, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_first_update_copies_then_averages():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].running_mean.fill_(2.0)
    update_ema(ema, model, 0.0)
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        assert torch.equal(e, p)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, 0.9)
    for b, e, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


@dataclass(frozen=True)
class Inner:
    sizes: tuple = (1, 2)
    pairs: tuple = ((2, 2, 1), (2, 2, 2))


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)


def test_config_from_dict_restores_tuples_and_nesting():
    cfg = Outer("y", 0.25, Inner((3,), ((1, 2, 3),)))
    back = config_from_dict(Outer, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    vae = get_preset("paper").vae
    assert config_from_dict(type(vae), json.loads(json.dumps(dataclasses.asdict(vae)))) == vae
    with pytest.raises(ValueError, match="no field"):
        config_from_dict(Inner, {"sizes": [1], "bogus": 2})


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Conv3d(2, 3, 3)
    cfg = get_preset("tiny").vae
    path = save_checkpoint(tmp_path / "m.safetensors", model, "vae", cfg,
                           {"scale": 0.75, "grid": {"size": 24}, "eval": {"psnr": 30.0}})
    state, config, meta = load_checkpoint(path, stage="vae")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert config_from_dict(type(cfg), config) == cfg
    assert meta == {"scale": 0.75, "grid": {"size": 24}, "eval": {"psnr": 30.0}}
    assert not list(tmp_path.glob(".tmp*"))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "n.safetensors", model, "vae", cfg, {"stage": "x"})


def test_checkpoint_errors(tmp_path):
    cfg = get_preset("tiny").vae
    good = save_checkpoint(tmp_path / "vae.safetensors", torch.nn.Linear(2, 2), "vae", cfg)
    with pytest.raises(DataError, match="expected a 'static'"):
        load_checkpoint(good, stage="static")
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"hello": "world"})
    with pytest.raises(DataError, match="not a synth4d checkpoint") as info:
        load_checkpoint(foreign)
    assert info.value.path == str(foreign)


def test_state_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    update_ema(ema, model, 0.0)
    sampler = FrameSampler(5)
    sampler.indices(10, 3)
    np.random.seed(3)
    path = save_state(tmp_path / "s.pt", model, opt, ema, 7, {"sampler": sampler.state(), "best": {"score": 0.5}})
    expect_torch, expect_np, expect_draw = torch.rand(3), np.random.rand(3), sampler.indices(100, 4)
    # weights_only loading must accept the file as written.
    assert torch.load(path, weights_only=True)["step"] == 7

    model2 = torch.nn.Linear(3, 2)
    ema2 = make_ema(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(123)
    np.random.seed(123)
    step, extra = load_state(path, model2, opt2, ema2)
    sampler2 = FrameSampler(0)
    sampler2.set_state(extra["sampler"])
    assert step == 7 and extra["best"] == {"score": 0.5}
    assert torch.equal(torch.rand(3), expect_torch) and np.array_equal(np.random.rand(3), expect_np)
    assert sampler2.indices(100, 4) == expect_draw
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"][0]["exp_avg"].equal(opt2.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unusable resume state"):
        load_state(tmp_path / "bad.pt", model2, opt2, ema2)


def test_split_is_recorded_and_checked(tmp_path):
    ids = [f"s{i:02d}" for i in range(20)]
    train, val = write_split(tmp_path, ids, 0.1, seed=1)
    assert len(val) == 2 and sorted(train + val) == ids
    assert read_split(tmp_path, ids) == (train, val)
    with pytest.raises(UserError, match="no longer hold"):
        read_split(tmp_path, ids[:-5])
    with pytest.raises(DataError):
        read_split(tmp_path / "nothing")


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        select_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            select_device("cuda")


def test_run_log_writes_window_means(tmp_path):
    log = RunLog(tmp_path, total_steps=5, every=2)
    for step, loss in enumerate([1.0, 3.0, 5.0, 7.0]):
        log.step(step, {"loss": loss}, lr=1e-3)
    log.buckets(3, {"t0-499": 0.2})
    log.eval(4, {"psnr": 30.0})
    log.step(4, {"loss": 9.0}, lr=1e-3)
    log.close()  # flushes the unfinished window
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0].startswith("step 2 loss 2 ") and lines[1].startswith("step 4 loss 6 ")
    assert "buckets t0-499 0.2" in lines[2] and json.loads(lines[3].split(" eval ")[1]) == {"psnr": 30.0}
    assert lines[4].startswith("step 5 loss 9 ") and len(lines) == 5
    assert math.isfinite(float(lines[0].split("steps/s ")[1]))
