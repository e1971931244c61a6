"""The training loop both latent diffusion stages share; static.py and motion.py say what to learn.

A stage is a `Task`: its name, its denoiser config and a `batch` method that turns encoded
subjects into (x0, cond, ctx, frames). Everything else — encoding the data once, the split,
condition normalisation, CFG dropout, v-prediction on a cosine schedule, EMA, warmup, gradient
clipping, per-timestep-bucket loss logs, a held-out loss at fixed noise, checkpoints and exact
resume — is the same for both and lives here.
Tensor axes: (B, C, X, Y, Z) latents; cond is a dict of (B,) / (B, S) tensors (see nets.unet).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from cine import DataError, UserError
from cine.priors import fit_priors
from nets.config import get_preset
from nets.diffusion import diffusion_loss, make_schedule, q_sample, timestep_buckets
from nets.unet import UNet
from train.common import (FrameSampler, RunLog, autocast, config_from_dict, load_checkpoint, load_state,
                          lr_at, make_ema, read_split, resumed_settings, save_checkpoint, save_state,
                          select_device, update_ema, write_split)
from train.latents import encode_dataset

SCHEDULE, PRED = "cosine", "v"
# v loss capped at SNR + 1 = 5 (nets.diffusion): min-SNR's fast convergence without its blind spot at
# zero SNR, where the first DDIM step predicts from the conditions alone.
WEIGHTING = "min_snr_v"
WEIGHTINGS = ("min_snr_v", "min_snr", "none")
P_DROP_ALL, P_DROP_EACH = 0.1, 0.15   # CFG dropout: all conditions together, and each on its own
EMA_DECAY = 0.999
VAL_FRACTION = 0.1                    # same fraction and seed as the VAE: the same subjects are held out
N_BUCKETS = 4


def normaliser(subjects, names) -> dict:
    """name -> (mean, std) of the condition over the subjects that have it (std floored at 1e-3)."""
    out = {}
    for n in names:
        v = np.array([s.values()[n] for s in subjects if n in s.values() and s.values()[n] is not None], dtype=float)
        out[n] = (float(v.mean()), float(max(v.std(), 1e-3))) if len(v) else (0.0, 1.0)
    return out


def cond_tensors(rows, names, norm, dx_vocab) -> dict:
    """rows: dicts of condition values (missing or None = absent) -> dx (B,), scalars (B, S), present (B, S)."""
    null = len(dx_vocab)
    dx = torch.tensor([dx_vocab.index(r["dx"]) if r.get("dx") in dx_vocab else null for r in rows])
    present = torch.tensor([[r.get(n) is not None and math.isfinite(r[n]) for n in names] for r in rows])
    scalars = torch.tensor([[(r[n] - norm[n][0]) / norm[n][1] if p else 0.0 for n, p in zip(names, ps)]
                            for r, ps in zip(rows, present.tolist())], dtype=torch.float32)
    B, S = len(rows), len(names)
    return {"dx": dx.long(), "scalars": scalars.reshape(B, S), "present": present.reshape(B, S)}


def train_ldm(task, data, vae_path, out, preset="cpu", steps=None, batch_size=None, lr=None, resume=False,
              device="cpu", seed=0, skip_bad=False, cache=None, ckpt_every=250, init=None, temporal=None,
              weighting=None) -> str:
    """Train one latent diffusion stage; returns the path of out/<stage>.safetensors (the EMA weights).

    init: a <stage>.safetensors to start from (fine-tuning): its weights, condition normalisation and
    target scale are kept; optimiser, learning-rate schedule and step count start afresh.
    temporal: add the temporal attention layer (UNetConfig.temporal) to the preset's network; with
    init, weights without that layer may be given (it starts as the identity).
    weighting: the loss weighting (nets.diffusion.diffusion_loss), WEIGHTING if not given.
    """
    out, stage = Path(out), task.stage
    dev = select_device(device)
    ckpt_path, state_path = out / f"{stage}.safetensors", out / f"{stage}.state.pt"
    run = {"preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "vae": str(Path(vae_path).resolve()), "init": init and str(Path(init).resolve()), "temporal": temporal or None,
           "weighting": weighting}
    if resume:
        if not state_path.is_file():
            raise UserError(f"nothing to resume in {out} (no {state_path.name}); run without --resume to start")
        run = resumed_settings(out / "run.json", run)
    elif state_path.exists() or ckpt_path.exists():
        raise UserError(f"{out} already holds a {stage} run; pass --resume to continue it or choose another --out")
    # A run recorded before the weighting was a setting trained with min_snr, the default then.
    run["weighting"] = run.get("weighting") or ("min_snr" if resume else WEIGHTING)
    if run["weighting"] not in WEIGHTINGS:
        raise UserError(f"unknown loss weighting {run['weighting']!r}; choose {', '.join(WEIGHTINGS)}")
    p = get_preset(run["preset"])
    defaults = getattr(p, f"train_{stage}")
    total = run["steps"] = run["steps"] or defaults.steps
    bs = run["batch_size"] = run["batch_size"] or defaults.batch_size
    peak = run["lr"] = run["lr"] or defaults.lr
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=1))

    subjects, vae_meta = encode_dataset(data, run["vae"], cache=cache, skip_bad=skip_bad, device=device)
    by_id = {s.id: s for s in subjects}
    train_ids, val_ids = (read_split(out, by_id) if resume else write_split(out, list(by_id), VAL_FRACTION, run["seed"]))
    train, val = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
    dx_vocab = sorted({s.dx for s in train if s.dx})
    cfg = dataclasses.replace(getattr(p, stage), dx_vocab=tuple(dx_vocab), temporal=bool(run.get("temporal")))
    if vae_meta["grid"] != p.grid:
        raise UserError(f"the VAE {run['vae']} was trained on another grid than preset {p.name!r}")
    norm = normaliser(train, cfg.scalars)
    task.fit(train)

    torch.manual_seed(run["seed"])
    model = UNet(cfg)
    if run.get("init"):
        norm = load_init(run["init"], model, task, cfg, vae_meta["scale"])
    # channels_last_3d: on the CPU, conv3d's weight gradient is several times faster in this layout.
    model = model.to(dev, memory_format=torch.channels_last_3d)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
    sched = make_schedule(SCHEDULE)
    sampler = FrameSampler(run["seed"])
    start, history = 0, []  # history: held-out loss against step and cumulative training seconds
    if resume:
        start, extra = load_state(state_path, model, opt, ema)
        sampler.set_state(extra["sampler"])
        history = json.loads(extra["history"])
    warmup = min(250, max(1, total // 20))
    meta = {"preset": p.name, "schedule": SCHEDULE, "pred": PRED, "weighting": run["weighting"], "norm": norm,
            "vae_scale": vae_meta["scale"], "grid": dataclasses.asdict(p.grid), "train_subjects": len(train),
            "seed": run["seed"], **task.meta()}
    if stage == "static":  # the prior is fitted on the labelled subjects, whose measures are known
        labelled = [s.values() for s in train if {"lvedv", "lvesv", "rvedv", "rvesv", "lv_mass"} <= set(s.measures)]
        meta["priors"] = fit_priors(labelled)

    log = RunLog(out, total, start)
    seconds0 = history[-1]["seconds"] if history else 0
    log.note(f"{stage} LDM {p.name}: {len(train)} training subjects, {len(val)} held out, "
             f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f}M parameters; steps {start}->{total}, "
             f"batch {bs}, lr {peak:g}, device {dev}")
    model.train()
    bucket_sum, bucket_n = torch.zeros(N_BUCKETS), torch.zeros(N_BUCKETS)
    for step in range(start, total):
        lr_now = lr_at(step, peak, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr_now
        x0, cond, ctx, frames = task.batch(train, sampler, bs, norm, dx_vocab)
        cond = model.drop_conditions(cond, P_DROP_ALL, P_DROP_EACH, generator=sampler.generator)
        t = torch.randint(0, sched.n_steps, (x0.shape[0],), generator=sampler.generator)
        eps = sampler.normal(*x0.shape)
        x0, eps, t = x0.to(dev), eps.to(dev), t.to(dev)
        ctx = None if ctx is None else ctx.to(dev, memory_format=torch.channels_last_3d)
        cond = {k: v.to(dev) for k, v in cond.items()}
        with autocast(dev):
            x_t = q_sample(x0, t, eps, sched).contiguous(memory_format=torch.channels_last_3d)
            pred = model(x_t, t, cond, ctx=ctx, frames=frames)
        per_sample = diffusion_loss(pred.float(), x0, eps, t, sched, pred=PRED, weighting=run["weighting"])  # (B,)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up (decay (1 + n) / (10 + n)): a few-thousand-step run is not dominated by early weights.
        update_ema(ema, model, min(EMA_DECAY, (1 + step) / (10 + step)) if step > 0 else 0.0)
        log.step(step, {"loss": loss.item()}, lr_now)
        b = timestep_buckets(t, sched, N_BUCKETS).cpu()
        bucket_sum.index_add_(0, b, per_sample.detach().cpu())
        bucket_n.index_add_(0, b, torch.ones_like(per_sample.detach().cpu()))

        done = step + 1
        if done % ckpt_every == 0 or done == total:
            with log.paused():
                edges = [i * sched.n_steps // N_BUCKETS for i in range(N_BUCKETS + 1)]
                log.buckets(step, {f"t{edges[i]}-{edges[i + 1] - 1}": (bucket_sum[i] / bucket_n[i].clamp_min(1)).item()
                                   for i in range(N_BUCKETS)})
                bucket_sum.zero_(), bucket_n.zero_()
                val_loss = held_out_loss(task, ema, val or train, sched, norm, dx_vocab, dev)
                seconds = round(seconds0 + log.bar.format_dict["elapsed"])
                history.append({"step": done, "val_loss": val_loss, "seconds": seconds})
                log.eval(done, {"val_loss": val_loss})
                save_checkpoint(ckpt_path, ema, stage, cfg, {**meta, "step": done, "history": history})
                save_state(state_path, model, opt, ema, done,
                           {"sampler": sampler.state(), "history": json.dumps(history)})
    log.close()
    return str(ckpt_path)


def load_init(path, model, task, cfg, vae_scale) -> dict:
    """Load the weights at `path` into `model` for fine-tuning; returns their condition normalisation.

    The checkpoint must be of this stage, built like `cfg` (same preset and diagnoses) and trained on
    latents of a VAE with the same scale; otherwise the weights would mean something else here.
    """
    state, config, meta = load_checkpoint(path, task.stage)
    given = config_from_dict(type(cfg), config)
    if given != cfg and given != dataclasses.replace(cfg, temporal=False):
        raise DataError(path, f"its network differs from this run's (preset or diagnoses {list(cfg.dx_vocab)}); "
                              "fine-tune with the same --preset on data with the same diagnoses")
    if not math.isclose(meta.get("vae_scale", float("nan")), vae_scale, rel_tol=1e-3):
        raise DataError(path, "it was trained on the latents of another VAE; give that VAE with --vae")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or any(not k.startswith("temporal.") for k in missing):  # only a new temporal layer may be missing
        raise DataError(path, f"its weights do not fit this network ({(unexpected + missing)[0]})")
    task.load_meta(meta)
    return {k: tuple(v) for k, v in meta["norm"].items()}


@torch.no_grad()
def held_out_loss(task, model, subjects, sched, norm, dx_vocab, dev, n_batches=4, bs=16) -> float:
    """Mean loss on held-out subjects at fixed noise and evenly spread timesteps: comparable across steps."""
    sampler = FrameSampler(12345)
    losses = []
    for _ in range(n_batches):
        x0, cond, ctx, frames = task.batch(subjects, sampler, bs, norm, dx_vocab)
        t = torch.linspace(0, sched.n_steps - 1, x0.shape[0]).long()
        eps = sampler.normal(*x0.shape)
        x0, eps, t = x0.to(dev), eps.to(dev), t.to(dev)
        out = model(q_sample(x0, t, eps, sched), t, {k: v.to(dev) for k, v in cond.items()},
                    ctx=None if ctx is None else ctx.to(dev), frames=frames)
        losses.append(diffusion_loss(out.float(), x0, eps, t, sched, pred=PRED).mean().item())
    return float(np.mean(losses))
