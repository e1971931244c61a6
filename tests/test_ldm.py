"""The latent diffusion stages: self-describing checkpoints, exact resume, condition tensors."""
import math

import pytest
import torch
from safetensors.torch import load_file

import train.ldm as ldm
from cine import UserError
from train.common import load_checkpoint
from train.motion import MotionTask
from train.static import StaticTask


def test_checkpoints_describe_themselves(tiny_weights):
    _, config, meta = load_checkpoint(tiny_weights / "static.safetensors", stage="static")
    assert config["dx_vocab"] == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert set(meta["norm"]) == {"lvedv", "rvedv", "lv_mass", "slices", "slice_mm"}
    assert meta["vae_scale"] > 0 and meta["pred"] == "v" and meta["schedule"] == "cosine"
    assert set(meta["priors"]["dx"]) <= set(config["dx_vocab"]) and meta["priors"]["fields"][0] == "lvedv"
    assert meta["history"][-1]["step"] == 4 and math.isfinite(meta["history"][-1]["val_loss"])
    _, config, meta = load_checkpoint(tiny_weights / "motion.safetensors", stage="motion")
    assert config["ctx_ch"] == config["in_ch"] + 1 and config["phase"]
    assert meta["residual_scale"] > 0 and set(meta["norm"]) == {"lvesv", "lvef", "rvesv", "rvef"}
    with pytest.raises(Exception, match="'static' checkpoint, expected a 'motion'"):
        load_checkpoint(tiny_weights / "static.safetensors", stage="motion")


def test_condition_tensors_mark_what_is_absent():
    norm = {"lvedv": (150.0, 50.0), "rvedv": (140.0, 40.0)}
    cond = ldm.cond_tensors([{"dx": "HCM", "lvedv": 200.0}, {"dx": None, "rvedv": 100.0, "lvedv": None}],
                            list(norm), norm, ["DCM", "HCM"])
    assert cond["dx"].tolist() == [1, 2]  # 2 = the null token
    assert cond["present"].tolist() == [[True, False], [False, True]]
    assert cond["scalars"].tolist() == [[1.0, 0.0], [0.0, -1.0]]


@pytest.mark.parametrize("task", [StaticTask, MotionTask], ids=["static", "motion"])
def test_resume_equals_uninterrupted(tiny_phantom, tiny_weights, tmp_path, monkeypatch, task):
    run = dict(preset="tiny", steps=4, batch_size=4, cache=tmp_path / "cache", ckpt_every=2)
    vae = tiny_weights / "vae.safetensors"
    ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "a", **run)

    real = ldm.lr_at

    def crash_in_step_3(step, *args):
        if step == 3:  # after the state of step 2 was written
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(ldm, "lr_at", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "b", **run)
    monkeypatch.setattr(ldm, "lr_at", real)
    with pytest.raises(UserError, match="--resume"):
        ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "b", **run)
    ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "b", resume=True, preset="tiny", cache=tmp_path / "cache",
                  ckpt_every=2)
    name = f"{task.stage}.safetensors"
    a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "a" / f"{task.stage}.state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / f"{task.stage}.state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_motion_batches_group_frames_and_measure_residuals(tiny_phantom, tiny_weights, tmp_path):
    from train.latents import encode_dataset
    from train.common import FrameSampler
    subjects, _ = encode_dataset(tiny_phantom, tiny_weights / "vae.safetensors", cache=tmp_path / "c")
    task = MotionTask()
    task.fit(subjects)
    norm = ldm.normaliser(subjects, ("lvesv", "lvef", "rvesv", "rvef"))
    x0, cond, ctx, frames = task.batch(subjects, FrameSampler(0), 8, norm, ["NOR"])
    assert x0.shape[0] == 8 and frames == 4 and ctx.shape[1] == x0.shape[1] + 1
    # The 4 frames of a subject share its context; the slice-mask channel is 1 on real slices only.
    assert torch.equal(ctx[0], ctx[3]) and set(ctx[:, -1].unique().tolist()) <= {0.0, 1.0}
    assert ((cond["phase"] >= 0) & (cond["phase"] < 1)).all()
    assert 0.3 < float(torch.cat([torch.from_numpy((s.z - s.z[s.ed])[..., :s.n_slices]).flatten()
                                  for s in subjects]).std()) * task.residual_scale < 3
