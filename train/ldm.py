"""The training loop both latent diffusion stages share; static.py and motion.py say what to learn.

A stage is a task object: its `stage` name and a `batch` method that turns encoded subjects into
(x0, cond, ctx), plus `fit`/`meta`/`load_meta` for what it measures on the data. Everything else —
encoding the data once, the split, condition normalisation, CFG dropout, v-prediction on a cosine schedule, EMA, warmup, gradient
clipping, per-timestep-bucket loss logs, a held-out loss at fixed noise, checkpoints and exact
resume — is the same for both and lives here.
Tensor axes: (B, C, X, Y, Z) latents; cond is a dict of (B,) / (B, S) tensors (see nets.conditions).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from synth4d.cine import UserError, atomic_write
from synth4d.cine.priors import FIELDS as PRIOR_FIELDS, fit_priors
from synth4d.jobs.encode import encode_dataset
from synth4d.nets.conditions import drop_conditions, normaliser
from synth4d.nets.config import get_preset
from synth4d.nets.device import autocast, select_device, uses_bf16
from synth4d.nets.diffusion import diffusion_loss, make_schedule, min_snr_v_weight, q_sample, timestep_buckets
from synth4d.nets.unet import UNet
from synth4d.train.common import (Processes, QuietLog, RunLog, RunRandom, check_finite, load_state, lr_at, make_ema,
                                  open_run, read_split, save_state, update_ema, write_split)
from synth4d.weights.checkpoint import REMOVED_AT, load_init, save_checkpoint

SCHEDULE, PRED = "cosine", "v"
WEIGHTING = "min_snr_v"   # the v loss capped at SNR + 1 = 5 (nets.diffusion.min_snr_v_weight)
P_DROP_ALL, P_DROP_EACH = 0.1, 0.15   # CFG dropout: all conditions together, and each on its own
EMA_DECAY = 0.999
VAL_FRACTION = 0.1                    # same fraction and seed as the VAE: the same subjects are held out
N_BUCKETS = 4


def train_ldm(task, data, vae_path, out, preset="cpu", steps=None, batch_size=None, lr=None, resume=False,
              device="auto", seed=0, skip_bad=False, cache=None, ckpt_every=250, init=None, csv_path=None) -> str:
    """Train one latent diffusion stage; returns the path of out/<stage>.safetensors (the EMA weights).

    init: a <stage>.safetensors to start from (fine-tuning): its weights, condition normalisation and
    target scale are kept; optimiser, learning-rate schedule and step count start afresh.
    """
    out, stage = Path(out), task.stage
    procs = Processes()
    dev = select_device(device)
    ckpt_path, state_path = out / f"{stage}.safetensors", out / f"{stage}.state.pt"
    run = {"preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "vae": str(Path(vae_path).resolve()), "init": init and str(Path(init).resolve())}
    run, restore = open_run(out, state_path, (ckpt_path,), run, resume, stage)
    if resume and (run.get("weighting", "min_snr") != WEIGHTING or run.get("temporal")):  # options measured, removed
        what = "the temporal layer" if run.get("temporal") else f"loss weighting {run.get('weighting', 'min_snr')}"
        raise UserError(f"{out} was trained with {what}, which this synth4d no longer has; "
                        f"resume it with the code of commit {REMOVED_AT}")
    run["weighting"] = WEIGHTING
    p = get_preset(run["preset"])
    defaults = getattr(p, f"train_{stage}")
    total = run["steps"] = run["steps"] or defaults.steps
    bs = run["batch_size"] = run["batch_size"] or defaults.batch_size
    peak = run["lr"] = run["lr"] or defaults.lr
    procs.start(dev, bs)
    procs.agree(run)
    if not procs.main:
        procs.barrier()   # rank 0 encodes (and caches) first, then writes the run folder
    subjects, vae_meta = encode_dataset(data, run["vae"], cache=cache, skip_bad=skip_bad, device=device,
                                        csv_path=csv_path)
    if vae_meta["grid"] != p.grid:
        raise UserError(f"the VAE {run['vae']} was trained on another grid than preset {p.name!r}")
    by_id = {s.id: s for s in subjects}
    if procs.main:
        # The run folder is made once the data are known to be usable: a refused data set leaves nothing behind.
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
        train_ids, val_ids = (read_split(out, by_id) if restore
                              else write_split(out, list(by_id), VAL_FRACTION, run["seed"]))
        procs.barrier()
    else:
        train_ids, val_ids = read_split(out, by_id)
    train, val = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
    dx_vocab = sorted({s.dx for s in train if s.dx})
    cfg = dataclasses.replace(getattr(p, stage), dx_vocab=tuple(dx_vocab))
    norm = normaliser([s.values() for s in train], cfg.scalars)
    task.fit(train)

    torch.manual_seed(run["seed"])
    model = UNet(cfg)
    if run.get("init"):
        init_meta = load_init(run["init"], model, stage, vae_meta["scale"])
        task.load_meta(init_meta)
        norm = {k: tuple(v) for k, v in init_meta["norm"].items()}
    # channels_last_3d: on the CPU, conv3d's weight gradient is several times faster in this layout.
    model = model.to(dev, memory_format=torch.channels_last_3d)
    ema = make_ema(model)
    net = procs.wrap(model, dev)      # the forward pass of this rank; `model` is what is saved
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
    sched = make_schedule(SCHEDULE)
    rng = RunRandom(run["seed"])
    start, history = 0, []  # history: held-out loss against step and cumulative training seconds
    if restore:
        start, extra = load_state(state_path, model, opt, ema)
        rng.set_state(extra.get("rng", extra.get("sampler")))  # "sampler": runs saved before the rename
        history = json.loads(extra["history"])
    warmup = min(250, max(1, total // 20))
    meta = {"preset": p.name, "schedule": SCHEDULE, "pred": PRED, "weighting": WEIGHTING, "norm": norm,
            "vae_scale": vae_meta["scale"], "grid": dataclasses.asdict(p.grid), "train_subjects": len(train),
            "seed": run["seed"], **task.meta()}
    if stage == "static":  # the prior is fitted on the labelled subjects, whose measures are known
        labelled = [s.values() for s in train if set(PRIOR_FIELDS) <= set(s.values())]
        meta["priors"] = fit_priors(labelled)

    log = RunLog(out, total, start) if procs.main else QuietLog()
    if resume and not restore:
        log.note(f"no resume state in {out} yet (stopped before its first checkpoint): starting again from step 0")
    seconds0 = history[-1]["seconds"] if history else 0
    log.note(f"{stage} LDM {p.name}: {len(train)} training subjects, {len(val)} held out, "
             f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f}M parameters; steps {start}->{total}, "
             f"batch {bs}, lr {peak:g}, device {dev} "
             f"({'bf16' if uses_bf16(dev) else 'fp32'})" + (f", {procs.world} processes" if procs.world > 1 else ""))
    part = procs.part(bs)
    model.train()
    bucket_sum, bucket_n = torch.zeros(N_BUCKETS), torch.zeros(N_BUCKETS)
    for step in range(start, total):
        lr_now = lr_at(step, peak, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr_now
        x0, cond, ctx = task.batch(train, rng, bs, norm, dx_vocab)
        cond = drop_conditions(cond, len(dx_vocab), P_DROP_ALL, P_DROP_EACH, generator=rng.generator)
        t = torch.randint(0, sched.n_steps, (x0.shape[0],), generator=rng.generator)
        eps = rng.normal(*x0.shape)
        x0, eps, t = x0[part].to(dev), eps[part].to(dev), t[part].to(dev)       # this rank's share of the batch
        ctx = None if ctx is None else ctx[part].to(dev, memory_format=torch.channels_last_3d)
        cond = {k: v[part].to(dev) for k, v in cond.items()}
        with autocast(dev):
            x_t = q_sample(x0, t, eps, sched).contiguous(memory_format=torch.channels_last_3d)
            pred = net(x_t, t, cond, ctx=ctx)
        mse = diffusion_loss(pred.float(), x0, eps, t, sched, pred=PRED)                           # (B,)
        per_sample = mse * min_snr_v_weight(t, sched).to(device=mse.device, dtype=mse.dtype)
        loss = per_sample.mean()
        check_finite(procs.mean(loss), step, out, log)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up (decay (1 + n) / (10 + n)): a few-thousand-step run is not dominated by early weights.
        update_ema(ema, model, min(EMA_DECAY, (1 + step) / (10 + step)) if step > 0 else 0.0)
        log.step(step, {"loss": procs.mean(loss).item()}, lr_now)
        b = timestep_buckets(t, sched, N_BUCKETS).cpu()
        bucket_sum.index_add_(0, b, per_sample.detach().cpu())
        bucket_n.index_add_(0, b, torch.ones_like(per_sample.detach().cpu()))

        done = step + 1
        if (done % ckpt_every == 0 or done == total) and procs.main:
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
                           {"rng": rng.state(), "history": json.dumps(history)})
    log.close()
    procs.barrier()
    procs.close()
    return str(ckpt_path)


@torch.no_grad()
def held_out_loss(task, model, subjects, sched, norm, dx_vocab, dev, n_batches=4, bs=16) -> float:
    """Mean loss on held-out subjects at fixed noise and evenly spread timesteps: comparable across steps."""
    rng = RunRandom(12345)
    losses = []
    for _ in range(n_batches):
        x0, cond, ctx = task.batch(subjects, rng, bs, norm, dx_vocab)
        t = torch.linspace(0, sched.n_steps - 1, x0.shape[0]).long()
        eps = rng.normal(*x0.shape)
        x0, eps, t = x0.to(dev), eps.to(dev), t.to(dev)
        out = model(q_sample(x0, t, eps, sched), t, {k: v.to(dev) for k, v in cond.items()},
                    ctx=None if ctx is None else ctx.to(dev))
        losses.append(diffusion_loss(out.float(), x0, eps, t, sched, pred=PRED).mean().item())
    return float(np.mean(losses))
