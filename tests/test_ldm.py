"""The latent diffusion stages: self-describing checkpoints, exact resume, condition tensors."""
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train.ldm as ldm
from cine import DataError, UserError
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


@pytest.mark.parametrize("task", [StaticTask, MotionTask], ids=["static", "motion"])
def test_init_fine_tunes_from_given_weights(tiny_phantom, tiny_weights, tmp_path, task):
    """--init starts from the given weights and keeps their normalisation; a foreign checkpoint is refused."""
    name = f"{task.stage}.safetensors"
    init = tiny_weights / name
    run = dict(preset="tiny", steps=1, batch_size=4, cache=tmp_path / "cache", lr=1e-12)
    out = ldm.train_ldm(task(), tiny_phantom, tiny_weights / "vae.safetensors", tmp_path / "ft", init=init, **run)
    start, _, meta0 = load_checkpoint(init)
    tuned, _, meta = load_checkpoint(out)
    assert all(torch.allclose(tuned[k].float(), start[k].float(), atol=1e-6) for k in start)
    assert meta["norm"] == meta0["norm"] and meta.get("residual_scale") == meta0.get("residual_scale")
    fresh, _, _ = load_checkpoint(ldm.train_ldm(task(), tiny_phantom, tiny_weights / "vae.safetensors",
                                                tmp_path / "fresh", **run))
    assert not all(torch.allclose(fresh[k].float(), start[k].float(), atol=1e-3) for k in start)
    other = tiny_weights / ("motion.safetensors" if task.stage == "static" else "static.safetensors")
    with pytest.raises(DataError, match="expected a"):
        ldm.train_ldm(task(), tiny_phantom, tiny_weights / "vae.safetensors", tmp_path / "bad", init=other, **run)


def test_temporal_layer_added_to_motion_weights_starts_as_identity(tiny_phantom, tiny_weights, tmp_path):
    from nets.unet import UNet
    from train.common import config_from_dict
    from nets.config import UNetConfig
    init = tiny_weights / "motion.safetensors"
    out = ldm.train_ldm(MotionTask(), tiny_phantom, tiny_weights / "vae.safetensors", tmp_path / "t", init=init,
                        temporal=True, preset="tiny", steps=1, batch_size=4, cache=tmp_path / "cache", lr=1e-12)
    start, config0, _ = load_checkpoint(init)
    tuned, config, _ = load_checkpoint(out)
    assert config["temporal"] and not config0["temporal"]
    assert {k for k in tuned if k.startswith("temporal.")} and set(start) < set(tuned)
    nets = []
    for state, cfg in ((start, config0), (tuned, config)):
        net = UNet(config_from_dict(UNetConfig, cfg)).eval()
        net.load_state_dict({k: v.float() for k, v in state.items()})
        nets.append(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, config["in_ch"], 8, 8, 4), generator=g)
    ctx = torch.randn((4, config["ctx_ch"], 8, 8, 4), generator=g)
    cond = {"dx": torch.tensor([0, 1, 2, 3]), "scalars": torch.zeros(4, 4), "present": torch.ones(4, 4, dtype=torch.bool),
            "phase": torch.tensor([0.0, 0.25, 0.5, 0.75])}
    with torch.no_grad():
        a, b = (net(x, torch.full((4,), 300), cond, ctx=ctx, frames=4) for net in nets)
    assert torch.allclose(a, b, atol=1e-5)


def test_latent_cache_is_per_subject(tiny_phantom, tiny_weights, tmp_path):
    """Adding a subject encodes only that one; an unreadable cache file is encoded afresh, never trusted."""
    from train.latents import encode_dataset
    vae = tiny_weights / "vae.safetensors"
    part = tmp_path / "part"
    shutil.copytree(tiny_phantom, part)
    dropped = sorted(p for p in part.iterdir() if p.is_dir())[-1]
    shutil.rmtree(dropped)
    cache = tmp_path / "cache"
    first, _ = encode_dataset(part, vae, cache=cache)
    files = sorted((cache / "latents").rglob("*.npy"))
    assert len(files) == len(first)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    full, _ = encode_dataset(tiny_phantom, vae, cache=cache)
    assert len(full) == len(first) + 1 and len(list((cache / "latents").rglob("*.npy"))) == len(full)
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())            # none re-encoded
    by_id = {s.id: s for s in full}
    assert all(np.array_equal(s.z, by_id[s.id].z) for s in first)
    files[0].write_bytes(b"not a latent")
    files[1].write_bytes(b"")
    again, _ = encode_dataset(tiny_phantom, vae, cache=cache)
    fresh, _ = encode_dataset(tiny_phantom, vae, cache=tmp_path / "fresh")
    assert all(np.array_equal(a.z, b.z) for a, b in zip(again, fresh))


def test_weighting_is_a_recorded_run_setting(tiny_phantom, tiny_weights, tmp_path):
    """The weighting defaults to min_snr_v, is stored in the checkpoint, and a resume keeps the run's own."""
    run = dict(preset="tiny", batch_size=4, cache=tmp_path / "cache")
    vae = tiny_weights / "vae.safetensors"
    default = ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / "a", steps=1, **run)
    assert load_checkpoint(default)[2]["weighting"] == "min_snr_v"
    ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / "b", steps=1, weighting="min_snr", **run)
    resumed = ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / "b", steps=2, resume=True, **run)
    assert load_checkpoint(resumed)[2]["weighting"] == "min_snr"
    with pytest.raises(UserError, match="unknown loss weighting"):
        ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / "c", steps=1, weighting="snr", **run)
    assert not (tmp_path / "c").exists()
