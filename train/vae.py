"""Stage 1: train the semi-supervised image + mask VAE on every frame of a cine data set.

Axis vocabulary: a prepared cine is (X, Y, Z, T) on the preset grid; a batch is (B, 1, X, Y, Z)
images, (B, X, Y, Z) integer masks, (B,) label weights and (B, 1, 1, 1, Z) slice weights.
Every frame trains the image path (L1, an in-plane frequency-domain L1, a small KL and, from a
quarter of the run on, a patch adversarial term); the mask path (cross-entropy + soft Dice
over RV, MYO, LV) learns only from frames that carry a label (ED/ES of labelled subjects):
a per-sample label weight of 0 removes a frame from the mask loss exactly. Padding slices
(beyond a subject's n_slices) count in no loss.

Pixel L1 alone gives soft images: a thin wall missed by a pixel costs little against the large
flat regions. The frequency term (L1 of the difference of the slices' 2D Fourier transforms)
weighs every spatial frequency alike, fine detail included; the adversarial term (hinge loss of a
PatchGAN critic of slices, nets.vae.PatchDiscriminator) penalises textures and edges that no real
slice has.

An SSIM term (1 - SSIM of the real slices, the Gaussian-window SSIM of cine.metrics.ssim) can join
the image loss (`--ssim`): it rewards the local means, contrasts and structure SSIM scores, which the
adversarial term trades away for texture.

`--finetune-decoder VAE` trains only the image decoder of a trained VAE, with its encoder and mask
decoder frozen: the latents and the decoded masks stay exactly as they were, so diffusion stages
trained on that VAE's latents stay valid with the new file. The critic then joins from the start.

Run folder: vae.safetensors (best held-out labelled Dice; SSIM when fine-tuning the decoder, where
the Dice cannot change), vae_last.safetensors, vae.state.pt (resume), split.json, run.json (run
settings), log.txt.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synth4d.cine import LABELS, UserError, atomic_write
from synth4d.nets.config import get_preset
from synth4d.nets.device import autocast, select_device, uses_bf16
from synth4d.nets.pipeline import encode_frames, reconstruct_frames
from synth4d.nets.vae import VAE, PatchDiscriminator
from synth4d.train.common import (Processes, QuietLog, RunLog, RunRandom, check_finite, load_state, lr_at, make_ema,
                                  open_run, read_split, save_state, update_ema, write_split)
from synth4d.weights.checkpoint import load_vae, save_checkpoint

KL_WEIGHT = 1e-6     # on the KL summed over the latent: keeps the posterior near N(0, I) in scale
                     # while the latent stays informative (posterior std well below 1)
EMA_DECAY = 0.999
VAL_FRACTION = 0.1
SCALE_FRAMES = 128   # training frames whose posterior means give the latent scale factor
FREQUENCY_WEIGHT = 1.0   # default weights of the image path's extra terms (run settings, --frequency / --adversarial)
ADVERSARIAL_WEIGHT = 0.05
ADVERSARIAL_START = 0.25  # the critic joins after this fraction of the run, once reconstructions are coarse-right
EVAL_FRAMES = 8      # held-out frames per subject spread over the cycle, besides the labelled ones
STRUCTURES = (1, 2, 3)


def train_vae(data, out, preset="cpu", steps=None, batch_size=None, lr=None, resume=False, device="auto",
              seed=0, skip_bad=False, cache=None, eval_every=500, csv_path=None, frequency=None,
              adversarial=None, ssim=None, finetune_decoder=None) -> str:
    """Train the VAE on the data set in `data`; returns the path of the best checkpoint (out/vae.safetensors)."""
    from synth4d.cine.prep import prepare_dataset

    out = Path(out)
    procs = Processes()
    dev = select_device(device)
    state_path, best_path, last_path = out / "vae.state.pt", out / "vae.safetensors", out / "vae_last.safetensors"
    run = {"preset": preset, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "frequency": frequency, "adversarial": adversarial, "ssim": ssim,
           "finetune_decoder": str(finetune_decoder) if finetune_decoder is not None else None}
    run, restore = open_run(out, state_path, (best_path, last_path), run, resume, "VAE")
    for key, default in (("frequency", FREQUENCY_WEIGHT), ("adversarial", ADVERSARIAL_WEIGHT), ("ssim", 0.0)):
        # a run recorded before these terms existed resumes without them
        run[key] = default if run.get(key) is None and not restore else float(run.get(key) or 0.0)
    p = get_preset(run["preset"])
    start_from = None
    if run.get("finetune_decoder") and not restore:   # checked before any data are prepared or files written
        start_from, start_meta = load_vae(run["finetune_decoder"])
        if start_from.cfg != p.vae or start_meta.get("grid") not in (None, p.grid):
            raise UserError(f"{run['finetune_decoder']}: a VAE of another preset than {p.name!r} (its config or grid "
                            f"differs); pass --preset to match it")
    run["steps"] = run["steps"] or p.train_vae.steps
    run["batch_size"] = run["batch_size"] or p.train_vae.batch_size
    run["lr"] = run["lr"] or p.train_vae.lr
    total, bs, seed = run["steps"], run["batch_size"], run["seed"]
    procs.start(dev, bs)
    procs.agree(run)
    if not procs.main:
        procs.barrier()   # rank 0 prepares (and caches) first, then writes the run folder
    # Images as float16 (800 phantom subjects on the cpu grid: 12 GB as float32); batches are cast back.
    subjects = {s.id: s for s in prepare_dataset(data, p.grid, cache_dir=cache, skip_bad=skip_bad,
                                                 progress=procs.main, csv_path=csv_path, half=True)}
    if len(subjects) < 2:
        raise UserError(f"{data} holds {len(subjects)} usable subject; the VAE needs at least 2 (one is held out)")
    if procs.main:
        # The run folder is made once the data are known to be usable: a refused data set leaves nothing behind.
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
        train_ids, val_ids = (read_split(out, subjects) if restore
                              else write_split(out, list(subjects), VAL_FRACTION, seed))
        procs.barrier()
    else:
        train_ids, val_ids = read_split(out, subjects)
    train, val = [subjects[i] for i in train_ids], [subjects[i] for i in val_ids]
    for subj in val:     # evaluated in float32
        subj.image = subj.image.astype(np.float32)
    frames = [(s, t) for s, subj in enumerate(train) for t in range(subj.image.shape[3])]
    labelled = [(s, t) for s, subj in enumerate(train) for t in sorted(subj.masks)]

    torch.manual_seed(seed)
    # channels_last_3d: on the CPU, conv3d's weight gradient is several times faster in this layout.
    model = VAE(p.vae)
    decoder_only = bool(run.get("finetune_decoder"))
    if start_from is not None:
        model.load_state_dict(start_from.state_dict())
    if decoder_only:   # the encoder and the mask decoder stay as they are: same latents, same masks
        model.encoder.requires_grad_(False)
        model.mask_decoder.requires_grad_(False)
    model = model.to(dev, memory_format=torch.channels_last_3d)
    ema = make_ema(model)
    trained = model.image_decoder if decoder_only else model
    net = procs.wrap(trained, dev)    # the forward pass of this rank (the trained part); `model` is what is saved
    opt = torch.optim.AdamW(trained.parameters(), lr=run["lr"], betas=(0.9, 0.999), weight_decay=0.01)
    critic = PatchDiscriminator().to(dev) if run["adversarial"] > 0 else None
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=run["lr"], betas=(0.5, 0.9), weight_decay=0.0) \
        if critic is not None else None
    rng = RunRandom(seed)
    start, best = 0, {"score": -float("inf")}
    if restore:
        start, extra = load_state(state_path, model, opt, ema)
        rng.set_state(extra.get("rng", extra.get("sampler")))  # "sampler": runs saved before the rename
        best = extra["best"]
        if critic is not None and "critic" in extra:
            critic.load_state_dict(extra["critic"])
            critic_opt.load_state_dict(extra["critic_opt"])
    warmup = min(200, max(1, total // 20))
    adv_start = 0 if decoder_only else int(ADVERSARIAL_START * total)
    decay = min(EMA_DECAY, 1.0 - 10.0 / total)  # short runs would otherwise evaluate the initial weights
    meta = {"preset": p.name, "grid": dataclasses.asdict(p.grid), "train_subjects": len(train),
            "labelled_frames": len(labelled), "seed": seed}

    log = RunLog(out, total, start) if procs.main else QuietLog()
    if resume and not restore:
        log.note(f"no resume state in {out} yet (stopped before its first evaluation): starting again from step 0")
    log.note(f"VAE {p.name}: {len(train)} training subjects ({len(frames)} frames, {len(labelled)} labelled), "
             f"{len(val)} held out; steps {start}->{total}, batch {bs}, lr {run['lr']:g}, frequency term "
             f"{run['frequency']:g}, adversarial {run['adversarial']:g} from step {adv_start}, SSIM term {run['ssim']:g}"
             + (f", image decoder only (from {run['finetune_decoder']})" if decoder_only else "") + f", device {dev} "
             f"({'bf16' if uses_bf16(dev) else 'fp32'})"
             + (f", {procs.world} processes" if procs.world > 1 else ""))
    part = procs.part(bs)
    model.train()
    for step in range(start, total):
        lr_now = lr_at(step, run["lr"], warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr_now
        batch = _batch(train, frames, labelled, rng, bs)                       # the global batch, on every rank
        X, Y, Z = batch[0].shape[2:]
        f = p.vae.factor
        noise = rng.normal(bs, p.vae.latent_ch, -(-X // f), -(-Y // f), Z)   # the posterior draw, also global
        totals = loss_totals(batch[1], batch[3], batch[4])
        x, target, mask, label_w, zmask, noise = (t[part].to(dev) for t in (*batch, noise))   # this rank's share
        x = x.to(memory_format=torch.channels_last_3d)
        totals = {k: v.to(dev) for k, v in totals.items()}
        if decoder_only:
            with torch.no_grad(), autocast(dev):
                z = model.encode(x).sample(noise=noise)
            with autocast(dev):
                image = net(z)[:, :, :X, :Y]
            losses = image_loss(image, target, zmask, totals, share=procs.world, frequency=run["frequency"],
                                ssim=run["ssim"])
        else:
            with autocast(dev):
                image, logits, posterior = net(x, noise=noise)
            losses = vae_loss(image, logits, posterior, target, mask, label_w, zmask, totals=totals,
                              share=procs.world, frequency=run["frequency"], ssim=run["ssim"])
        adversarial = critic is not None and step >= adv_start
        if adversarial:   # the generator's hinge term: raise the critic's score of the reconstructed slices
            critic.requires_grad_(False)
            with autocast(dev):
                losses["adv"] = -critic(real_slices(image, zmask)).float().mean()
            critic.requires_grad_(True)
            losses["loss"] = losses["loss"] + run["adversarial"] * losses["adv"]
        check_finite(procs.mean(losses["loss"]), step, out, log)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        if adversarial:   # the critic's hinge loss (Lim and Ye 2017): real slices above +1, reconstructions below -1
            with autocast(dev):
                fake = critic(real_slices(image.detach(), zmask)).float()
                real = critic(real_slices(target, zmask)).float()
            losses["critic"] = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            critic_opt.zero_grad(set_to_none=True)
            losses["critic"].backward()
            procs.average_grads(critic)
            critic_opt.step()
        update_ema(ema, model, decay if step > 0 else 0.0)
        log.step(step, {k: procs.mean(v).item() for k, v in losses.items()}, lr_now)

        done = step + 1
        if (done % eval_every == 0 or done == total) and procs.main:
            with log.paused():
                figures = evaluate_vae(ema, val, dev)
                log.eval(done, figures)
                info = {**meta, "step": done, "eval": figures, "scale": latent_scale(ema, train, dev)}
                save_checkpoint(last_path, ema, "vae", p.vae, info)
                score = figures["ssim"] if decoder_only else figures.get("dice_labelled", figures["psnr"])
                if score > best["score"] or not best_path.exists():
                    best = {"score": score, "step": done}
                    save_checkpoint(best_path, ema, "vae", p.vae, info)
                extra = {"rng": rng.state(), "best": best}
                if critic is not None:
                    extra.update(critic=critic.state_dict(), critic_opt=critic_opt.state_dict())
                save_state(state_path, model, opt, ema, done, extra)
    log.note(f"best checkpoint: step {best.get('step')} ({best_path})")
    log.close()
    procs.barrier()
    procs.close()
    return str(best_path)


def _batch(train, frames, labelled, rng: RunRandom, bs: int):
    """Draw a batch: each slot is a labelled frame with probability 1/2 (when any exist), else any frame.

    Returns input (B, 1, X, Y, Z) with light intensity augmentation + noise, its clean target,
    masks (B, X, Y, Z) (zeros where unlabelled), label weights (B,) and slice weights (B, 1, 1, 1, Z).
    """
    from_labelled = (rng.uniform(bs) < 0.5).tolist() if labelled else [False] * bs
    picks = []
    for lab in from_labelled:
        pool = labelled if lab else frames
        picks.append(pool[rng.indices(len(pool), 1)[0]])
    image = torch.from_numpy(np.stack([train[s].image[..., t] for s, t in picks])).float()[:, None]  # (B, 1, X, Y, Z)
    shape = image.shape[2:]
    mask = torch.from_numpy(np.stack([train[s].masks.get(t, np.zeros(shape, np.uint8)) for s, t in picks])).long()
    label_w = torch.tensor([float(t in train[s].masks) for s, t in picks])
    zmask = torch.zeros(bs, 1, 1, 1, shape[2])
    for b, (s, _) in enumerate(picks):
        zmask[b, ..., :train[s].n_slices] = 1.0
    # Intensity-only augmentation keeps the image-mask pairing (flips would swap the heart's handedness).
    gamma = torch.exp(rng.uniform(bs, 1, 1, 1, 1, low=-0.2, high=0.2))
    gain = rng.uniform(bs, 1, 1, 1, 1, low=0.9, high=1.05)
    target = ((image + 1) / 2).clamp(0, 1).pow(gamma).mul(gain) * 2 - 1
    noise = rng.uniform(bs, 1, 1, 1, 1, high=0.03) * rng.normal(*image.shape)
    return target + noise, target, mask, label_w, zmask


def loss_totals(target, label_w, zmask) -> dict:
    """The denominators of vae_loss's weighted means over a (global) batch."""
    voxels = target.shape[2] * target.shape[3]
    return {"real": zmask.sum() * voxels, "labelled": (label_w[:, None, None, None] * zmask[:, 0]).sum() * voxels,
            "frames": label_w.sum()}


def real_slices(volume, zmask) -> torch.Tensor:
    """(B, 1, X, Y, Z) frames -> (N, 1, X, Y): their in-plane slices that are not padding."""
    slices = volume.permute(0, 4, 1, 2, 3).flatten(0, 1)            # (B * Z, 1, X, Y)
    return slices[zmask.reshape(-1) > 0]


def frequency_l1(image, target, zmask, pixels=None) -> torch.Tensor:
    """Mean |F(image) - F(target)| over the in-plane 2D Fourier coefficients (orthonormal) of real slices;
    pixels: the real pixels the mean is over (the global batch's, under data parallelism).

    Orthonormal: the coefficients carry the pixels' energy (Parseval), so the term has the pixel
    L1's scale; unlike it, each frequency counts alike, and a blurred edge loses at many of them.
    """
    diff = torch.fft.rfft2((image - target) * zmask, dim=(2, 3), norm="ortho")   # (B, 1, X, Y // 2 + 1, Z)
    pixels = zmask.sum() * image.shape[2] * image.shape[3] if pixels is None else pixels
    return diff.abs().sum() / (pixels * diff.shape[3] / image.shape[3]).clamp_min(1.0)


def _ssim_window(device) -> torch.Tensor:
    """The 7-tap Gaussian (sigma 1.5) of cine.metrics.ssim as a (1, 1, 7) kernel, float32."""
    from synth4d.cine.metrics import SSIM_RADIUS, SSIM_SIGMA
    taps = torch.exp(-0.5 * (torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float32) / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).to(device)[None, None]


def slice_ssim(image, target, data_range: float = 2.0) -> torch.Tensor:
    """Differentiable SSIM of in-plane slices (N, 1, X, Y) -> (N,), the same figure as cine.metrics.ssim
    per slice (Wang et al. 2004: Gaussian window sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' positions)."""
    from synth4d.cine.metrics import SSIM_K1, SSIM_K2
    x, y = image.float(), target.float()
    w = _ssim_window(x.device)
    wx, wy = w.view(1, 1, -1, 1), w.view(1, 1, 1, -1)

    def blur(a):   # separable Gaussian, along X then Y, at the fully inside positions only
        return F.conv2d(F.conv2d(a, wx), wy)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def image_loss(image, target, zmask, totals, share=1.0, frequency=0.0, ssim=0.0) -> dict:
    """The image path's terms (scalars): L1 on real slices, plus the frequency-domain L1 (weight `frequency`)
    and 1 - SSIM of the real slices (weight `ssim`) when their weights are > 0; "loss" is their weighted sum."""
    image = image.float()
    rec = ((image - target).abs() * zmask.expand_as(target)).sum() / totals["real"] * share
    terms = {"loss": rec, "l1": rec}
    if frequency > 0:
        terms["freq"] = frequency_l1(image, target, zmask, totals["real"]) * share
        terms["loss"] = terms["loss"] + frequency * terms["freq"]
    if ssim > 0:
        n_slices = (totals["real"] / (target.shape[2] * target.shape[3])).clamp_min(1.0)   # of the global batch
        scores = slice_ssim(real_slices(image, zmask), real_slices(target, zmask))
        terms["ssim"] = (1.0 - scores).sum() / n_slices * share
        terms["loss"] = terms["loss"] + ssim * terms["ssim"]
    return terms


def vae_loss(image, logits, posterior, target, mask, label_w, zmask, kl_weight=KL_WEIGHT, totals=None,
             share=1.0, frequency=0.0, ssim=0.0) -> dict:
    """Loss terms (scalars): the image terms (image_loss: L1, frequency-domain L1, SSIM) and KL on
    every frame, CE + soft Dice on labelled ones.

    image (B, 1, X, Y, Z), logits (B, C, X, Y, Z), target (B, 1, X, Y, Z), mask (B, X, Y, Z) long,
    label_w (B,) 1 for a labelled frame, 0 otherwise; zmask (B, 1, 1, 1, Z) 1 on real slices.
    Under data parallelism each rank passes the global batch's `totals` (loss_totals) and share = the
    world size, so that the ranks' averaged gradients are the global batch's.
    """
    logits = logits.float()
    totals = totals or loss_totals(target, label_w, zmask)
    terms = image_loss(image, target, zmask, totals, share, frequency, ssim)
    kl = posterior.kl().float().mean()
    voxel_w = label_w[:, None, None, None] * zmask[:, 0]                     # (B, 1, 1, Z) -> broadcast
    ce_map = F.cross_entropy(logits, mask, reduction="none")                 # (B, X, Y, Z)
    voxel_w = voxel_w.expand_as(ce_map)
    ce = (ce_map * voxel_w).sum() / totals["labelled"].clamp_min(1.0) * share
    prob = logits.softmax(dim=1)[:, 1:] * zmask                              # (B, C - 1, X, Y, Z)
    onehot = F.one_hot(mask, logits.shape[1]).movedim(-1, 1)[:, 1:].float() * zmask
    inter = (prob * onehot).sum(dim=(2, 3, 4))                               # (B, C - 1)
    denom = (prob + onehot).sum(dim=(2, 3, 4))
    soft_dice = 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean(dim=1)        # (B,)
    dice = (soft_dice * label_w).sum() / totals["frames"].clamp_min(1.0) * share
    terms["loss"] = terms["loss"] + kl_weight * kl + ce + dice
    terms.update(kl=kl, ce=ce, dice=dice)
    return terms


def evaluate_vae(model, subjects, device) -> dict:
    """Held-out figures: PSNR/SSIM, Dice per structure on labelled frames and, where a full-cycle
    ground truth exists (phantom), on frames that carry no label.

    Per subject: its labelled frames and EVAL_FRAMES frames spread over the cycle, the same ones
    at every evaluation (a CPU forward costs ~0.3 s a frame on the cpu preset).
    """
    from synth4d.cine.metrics import dice, psnr, ssim

    was_training = model.training
    model.eval()
    psnrs, ssims = [], []
    dices = {"labelled": {c: [] for c in STRUCTURES}, "unlabelled": {c: [] for c in STRUCTURES}}
    for subj in subjects:
        n_t = subj.image.shape[3]
        ts = sorted(set(subj.masks) | set(np.linspace(0, n_t - 1, min(EVAL_FRAMES, n_t)).round().astype(int).tolist()))
        for t, recon, pred, truth, kind in reconstruct_frames(model, subj, device, ts):
            psnrs.append(psnr(recon, subj.image[:, :, :subj.n_slices, t], data_range=2.0))
            ssims.append(ssim(recon, subj.image[:, :, :subj.n_slices, t], data_range=2.0))
            if kind is not None:
                for c, d in dice(pred, truth, labels=STRUCTURES).items():
                    dices[kind][c].append(d)
    model.train(was_training)
    figures = {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
    for kind, per in dices.items():
        for c, values in per.items():
            if values:
                figures[f"dice_{kind}_{LABELS[c]}"] = float(np.mean(values))
        if all(per.values()):
            figures[f"dice_{kind}"] = float(np.mean([figures[f"dice_{kind}_{LABELS[c]}"] for c in STRUCTURES]))
    return figures


@torch.no_grad()
def latent_scale(model, subjects, device, n_frames: int = SCALE_FRAMES) -> float:
    """1 / std of the posterior means over real slices of up to n_frames training frames, evenly picked."""
    frames = [(s, t) for s in subjects for t in range(s.image.shape[3])]
    picks = [frames[i] for i in np.linspace(0, len(frames) - 1, min(n_frames, len(frames))).round().astype(int)]
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.stack([s.image[..., t] for s, t in picks])).float()[:, None]     # (N, 1, X, Y, Z)
    mean = encode_frames(model, x, device)                                                  # (N, C, x, y, Z)
    values = [mean[j, ..., :s.n_slices].flatten() for j, (s, _) in enumerate(picks)]
    model.train(was_training)
    return float(1.0 / torch.cat(values).std().clamp_min(1e-8))
