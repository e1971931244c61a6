"""The latent diffusion stages: self-describing checkpoints, exact resume, batches, fine-tuning, the latent cache."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import synth4d.train.ldm as ldm
from synth4d.cine import DataError, UserError
from synth4d.nets.conditions import MOTION, motion_context, normaliser
from synth4d.train.common import RunRandom
from synth4d.train.motion import MotionTask
from synth4d.train.static import StaticTask
from synth4d.weights.checkpoint import REMOVED_AT, read_checkpoint


def test_checkpoints_describe_themselves(tiny_weights):
    _, config, meta = read_checkpoint(tiny_weights / "static.safetensors", stage="static")
    assert config["dx_vocab"] == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert set(meta["norm"]) == {"lvedv", "rvedv", "lv_mass", "slices", "slice_mm"}
    assert meta["vae_scale"] > 0 and meta["pred"] == "v" and meta["schedule"] == "cosine"
    assert set(meta["priors"]["dx"]) <= set(config["dx_vocab"]) and meta["priors"]["fields"][0] == "lvedv"
    assert meta["history"][-1]["step"] == 4 and math.isfinite(meta["history"][-1]["val_loss"])
    _, config, meta = read_checkpoint(tiny_weights / "motion.safetensors", stage="motion")
    assert config["ctx_ch"] == config["in_ch"] + 1 and config["phase"]
    assert meta["residual_scale"] > 0 and set(meta["norm"]) == {"lvesv", "lvef", "rvesv", "rvef"}
    with pytest.raises(Exception, match="'static' checkpoint, expected a 'motion'"):
        read_checkpoint(tiny_weights / "static.safetensors", stage="motion")


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

    # Killed between its first checkpoint and its first resume state: --resume starts again, same result.
    real_save = ldm.save_state
    monkeypatch.setattr(ldm, "save_state", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "c", **run)
    monkeypatch.setattr(ldm, "save_state", real_save)
    assert (tmp_path / "c" / name).is_file() and not (tmp_path / "c" / f"{task.stage}.state.pt").exists()
    ldm.train_ldm(task(), tiny_phantom, vae, tmp_path / "c", resume=True, preset="tiny", cache=tmp_path / "cache",
                  ckpt_every=2)
    c = load_file(tmp_path / "c" / name)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_motion_batches_group_frames_and_measure_residuals(tiny_phantom, tiny_weights, tmp_path):
    from synth4d.jobs.encode import encode_dataset
    subjects, _ = encode_dataset(tiny_phantom, tiny_weights / "vae.safetensors", cache=tmp_path / "c")
    task = MotionTask()
    task.fit(subjects)
    norm = normaliser([s.values() for s in subjects], MOTION)
    x0, cond, ctx = task.batch(subjects, RunRandom(0), 8, norm, ["NOR"])
    assert x0.shape[0] == 8 and ctx.shape[1] == x0.shape[1] + 1
    # The 4 frames of a subject share its context, motion_context of its ED latent (as in generation).
    first = subjects[RunRandom(0).indices(len(subjects), 2)[0]]
    assert torch.equal(ctx[0], ctx[3])
    assert torch.equal(ctx[0], motion_context(torch.from_numpy(first.z[first.ed])[None], first.n_slices)[0])
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
    start, _, meta0 = read_checkpoint(init)
    tuned, _, meta = read_checkpoint(out)
    assert all(torch.allclose(tuned[k].float(), start[k].float(), atol=1e-6) for k in start)
    assert meta["norm"] == meta0["norm"] and meta.get("residual_scale") == meta0.get("residual_scale")
    fresh, _, _ = read_checkpoint(ldm.train_ldm(task(), tiny_phantom, tiny_weights / "vae.safetensors",
                                                tmp_path / "fresh", **run))
    assert not all(torch.allclose(fresh[k].float(), start[k].float(), atol=1e-3) for k in start)
    other = tiny_weights / ("motion.safetensors" if task.stage == "static" else "static.safetensors")
    with pytest.raises(DataError, match="expected a"):
        ldm.train_ldm(task(), tiny_phantom, tiny_weights / "vae.safetensors", tmp_path / "bad", init=other, **run)


def test_latent_cache_is_per_subject(tiny_phantom, tiny_weights, tmp_path):
    """Adding a subject encodes only that one; an unreadable cache file is encoded afresh, never trusted."""
    from synth4d.jobs.encode import encode_dataset
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


def test_encoding_streams_and_skips_bad_subjects(tiny_phantom, tiny_weights, tmp_path, monkeypatch):
    """Encoding holds one prepared image at a time (no image outlives its latent); a broken subject is
    named in the error, or skipped with skip_bad and the others encoded."""
    import gc
    import weakref
    from synth4d.cine import DataError
    from synth4d.cine import prep
    from synth4d.jobs.encode import encode_dataset
    alive, most = [], [0]
    real = prep._prepare_cached

    def tracked(*args):
        p = real(*args)
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        alive.append(weakref.ref(p.image))
        return p
    monkeypatch.setattr(prep, "_prepare_cached", tracked)
    vae = tiny_weights / "vae.safetensors"
    subjects, _ = encode_dataset(tiny_phantom, vae, cache=tmp_path / "c")
    assert len(subjects) == len(alive) == 6 and most[0] <= 1
    broken = tmp_path / "broken"
    shutil.copytree(tiny_phantom, broken)
    victim = next(sorted(p for p in broken.iterdir() if p.is_dir())[2].glob("*_4d.nii.gz"))
    victim.write_bytes(b"not a NIfTI file")
    with pytest.raises(DataError, match=victim.name):
        encode_dataset(broken, vae, cache=tmp_path / "c")
    kept, _ = encode_dataset(broken, vae, cache=tmp_path / "c", skip_bad=True)
    assert len(kept) == 5 and victim.parent.name not in {s.id for s in kept}


def test_runs_of_removed_options_are_refused_on_resume(tiny_phantom, tiny_weights, tmp_path):
    """The loss weighting is min_snr_v, recorded in the checkpoint; a run recorded with a weighting or the temporal
    layer that were measured and removed cannot be resumed with this code, and the error names the commit that can."""
    run = dict(preset="tiny", batch_size=4, cache=tmp_path / "cache")
    vae = tiny_weights / "vae.safetensors"
    default = ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / "a", steps=1, **run)
    assert read_checkpoint(default)[2]["weighting"] == "min_snr_v"
    for name, edit in (("weighting", {"weighting": "min_snr"}), ("old", {"weighting": None}),
                       ("temporal", {"temporal": True})):
        shutil.copytree(tmp_path / "a", tmp_path / name)
        settings = json.loads((tmp_path / name / "run.json").read_text())
        settings.update(edit)
        (tmp_path / name / "run.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
        with pytest.raises(UserError, match=f"no longer has; resume it with the code of commit {REMOVED_AT}"):
            ldm.train_ldm(StaticTask(), tiny_phantom, vae, tmp_path / name, steps=2, resume=True, **run)


def test_a_fault_at_any_atomic_write_of_ldm_training_is_recovered(tiny_phantom, tiny_weights, tmp_path, monkeypatch):
    """Interrupt the static stage at its k-th atomic write (run.json, split.json, then checkpoint and resume
    state at every checkpoint), then --resume (or start, when nothing was written): the run ends with the
    weights, metadata and split of an uninterrupted one, for every k."""
    import synth4d.train.common as common
    import synth4d.weights.checkpoint as checkpoint
    from synth4d.train.static import train_static
    from tests.conftest import interrupt_each_write
    vae = tiny_weights / "vae.safetensors"
    run = dict(preset="tiny", steps=4, batch_size=2, ckpt_every=2, cache=tmp_path / "cache")
    train_static(tiny_phantom, vae, tmp_path / "whole", **run)

    def contents(folder):
        state, _, meta = read_checkpoint(folder / "static.safetensors")
        meta = {k: v for k, v in meta.items() if k != "history"}     # history holds wall-clock seconds
        return {k: v.numpy().tobytes() for k, v in state.items()}, meta, (folder / "split.json").read_bytes()

    def train(out, resume=False):
        train_static(tiny_phantom, vae, out, resume=resume, **({**run, "steps": None} if resume else run))

    k = interrupt_each_write(train, (ldm, common, checkpoint), monkeypatch, tmp_path, contents,
                             contents(tmp_path / "whole"))
    assert k == 7   # run.json, split.json, then the checkpoint and the resume state, twice
