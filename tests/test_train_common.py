"""The shared training pieces: schedule, EMA, resume state, split, the run's random source, log."""
import json
import math

import numpy as np
import pytest
import torch

from synth4d.cine import DataError, UserError
from synth4d.train.common import (RunLog, RunRandom, load_state, lr_at, make_ema, read_split, save_state, update_ema,
                                  write_split)


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


def test_state_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    update_ema(ema, model, 0.0)
    rng = RunRandom(5)
    rng.indices(10, 3)
    np.random.seed(3)
    path = save_state(tmp_path / "s.pt", model, opt, ema, 7, {"rng": rng.state(), "best": {"score": 0.5}})
    expect_torch, expect_np, expect_draw = torch.rand(3), np.random.rand(3), rng.indices(100, 4)
    # weights_only loading must accept the file as written.
    assert torch.load(path, weights_only=True)["step"] == 7

    model2 = torch.nn.Linear(3, 2)
    ema2 = make_ema(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(123)
    np.random.seed(123)
    step, extra = load_state(path, model2, opt2, ema2)
    rng2 = RunRandom(0)
    rng2.set_state(extra["rng"])
    assert step == 7 and extra["best"] == {"score": 0.5}
    assert torch.equal(torch.rand(3), expect_torch) and np.array_equal(np.random.rand(3), expect_np)
    assert rng2.indices(100, 4) == expect_draw
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
