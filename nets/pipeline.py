"""The chains of trained networks, arrays in, arrays out: generation (static LDM -> motion LDM -> VAE
decoding) and reconstruction (a cine through the VAE: image and class probabilities).

Axis vocabulary: latents (B, C, X, Y, Z); a cine is (X, Y, Z, T), a generated one with T cardiac frames
at phases 0, 1/T, ... (ED = phase 0); class probabilities (C, X, Y, Z, T). Generation runs one subject
at a time, from its own torch.Generator, so a subject comes out the same alone or in a batch. All
frames of a subject share their initial motion noise (and both samplers are deterministic), so frames differ
only through their phase.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from synth4d.cine.priors import warp_phases
from synth4d.nets.config import GridConfig
from synth4d.nets.conditions import cond_tensors, motion_context, null_conditions
from synth4d.nets.device import autocast
from synth4d.nets.diffusion import SAMPLERS, Schedule, ddim_timesteps
from synth4d.nets.unet import UNet
from synth4d.nets.vae import VAE


def periodic_interpolate(keys: torch.Tensor, phases) -> torch.Tensor:
    """Values at K evenly spaced phases k / K (K, ...) -> values at `phases` (T, ...) in [0, 1).

    Uniform Catmull-Rom on the closed cycle: passes through every key, C1-continuous, and
    periodic, so a cardiac cycle sampled at K keyframes comes back smooth at any frame count.
    """
    K = keys.shape[0]
    out = []
    for p in phases:
        u = float(p) * K
        i = int(u // 1)
        s = u - i
        w = ((-s ** 3 + 2 * s ** 2 - s) / 2, (3 * s ** 3 - 5 * s ** 2 + 2) / 2,
             (-3 * s ** 3 + 4 * s ** 2 + s) / 2, (s ** 3 - s ** 2) / 2)
        out.append(sum(wj * keys[(i - 1 + j) % K] for j, wj in enumerate(w)))
    return torch.stack(out)


@dataclass
class Generator4D:
    """The three trained networks and the figures their checkpoints hold, ready to generate subjects."""

    vae: VAE
    static: UNet
    motion: UNet
    sched: Schedule
    vae_scale: float          # latent = posterior mean * vae_scale
    residual_scale: float     # motion target = (z_t - z_ED) * residual_scale
    latent_size: tuple        # (X, Y, Z) of a latent
    static_norm: dict         # condition name -> (mean, std), see nets.conditions
    motion_norm: dict
    grid: GridConfig          # the grid the VAE was trained on, for callers placing the output
    priors: dict              # the per-diagnosis prior of the measures (cine.priors), for callers completing requests
    pred: str = "v"
    decode_batch: int = 8

    @property
    def dx_vocab(self) -> list:
        return list(self.static.cfg.dx_vocab)

    @torch.no_grad()
    def sample_static(self, cond, generator, steps, guidance, sampler="ddim", guided_steps=None) -> torch.Tensor:
        """cond (batch 1) -> the ED latent (1, C, X, Y, Z)."""
        shape = (1, self.static.cfg.in_ch) + self.latent_size
        x_T = torch.randn(shape, generator=generator).to(self.device)

        def model_fn(x, t, c):   # the sampler's own arithmetic stays in float32
            with autocast(self.device):
                return self.static(x, t, c).float()

        return SAMPLERS[sampler](model_fn, x_T, self.sched, steps=steps, guidance=guidance, guided_steps=guided_steps,
                                 cond=cond, uncond=null_conditions(cond, self.static.cond_embed.null_dx), pred=self.pred)

    @torch.no_grad()
    def sample_motion(self, z_ed, n_slices, cond, phases, generator, steps, guidance, sampler="ddim",
                      guided_steps=None, final_t=None) -> torch.Tensor:
        """z_ED (1, C, X, Y, Z), its real slice count, cond (batch 1), phases (T,) -> latents (T, C, X, Y, Z).
        final_t: the step grid's last timestep (nets.diffusion.ddim_timesteps; None: the trailing grid).

        The residual at phase 0 (ED) is zero by construction, and each frame's DDIM path is its own,
        so ED frames are not sampled at all (1/12 of the work at 12 keyframes).
        """
        phases = torch.as_tensor(phases, dtype=torch.float32, device=self.device)         # (T,)
        noise = torch.randn((1, self.motion.cfg.in_ch) + self.latent_size, generator=generator).to(self.device)
        residual = torch.zeros((len(phases),) + noise.shape[1:], device=self.device)       # (T, C, X, Y, Z)
        todo = phases != 0
        n = int(todo.sum())  # frames sampled
        if n:
            x_T = noise.expand(n, -1, -1, -1, -1).contiguous()                             # (n, C, X, Y, Z)
            sub = {**{k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}, "phase": phases[todo]}
            ctx = motion_context(z_ed, n_slices).expand(n, -1, -1, -1, -1)                 # (n, C + 1, X, Y, Z)

            def model_fn(x, t, c):
                reps = x.shape[0] // n  # 2 when guidance batches cond and uncond together
                with autocast(self.device):
                    return self.motion(x, t, c, ctx=ctx.repeat(reps, 1, 1, 1, 1)).float()

            residual[todo] = SAMPLERS[sampler](model_fn, x_T, self.sched, steps=steps, guidance=guidance, cond=sub,
                                               uncond=null_conditions(sub, self.motion.cond_embed.null_dx),
                                               pred=self.pred, guided_steps=guided_steps,
                                               timesteps=ddim_timesteps(self.sched, steps, final_t))
        residual[phases == 0] = 0
        return z_ed + residual / self.residual_scale

    @torch.no_grad()
    def decode(self, z) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (T, C, X, Y, Z) -> image (X, Y, Z, T) in [-1, 1] and labels (X, Y, Z, T) uint8."""
        images, labels = [], []
        for chunk in z.split(self.decode_batch):
            with autocast(self.device):
                image, logits = self.vae.decode(chunk / self.vae_scale)
            images.append(image[:, 0].float().clamp(-1, 1).cpu())                          # (b, X, Y, Z)
            labels.append(logits.float().argmax(dim=1).to(torch.uint8).cpu())              # (b, X, Y, Z)
        return torch.cat(images).permute(1, 2, 3, 0), torch.cat(labels).permute(1, 2, 3, 0)

    @property
    def device(self):
        return next(self.static.parameters()).device

    def generate(self, values: dict, n_slices, phases, seed, steps=25, guidance=2.0, keyframes=0, timings=None,
                 sampler="ddim", motion_sampler=None, motion_steps=None, motion_guidance=None, guided_steps=None,
                 motion_guided_steps=None, motion_final_t=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One subject: condition values (dx and scalars, see nets.conditions) -> image, labels (X, Y, Z, T).

        keyframes > 0 and fewer than the phases asked for: the motion model samples that many evenly
        spaced phases and the residual latents of the others are interpolated along the cycle
        (periodic_interpolate), which divides the motion cost by T / keyframes. sampler: a name in
        nets.diffusion.SAMPLERS, with `steps` network evaluations (times two with guidance) per model;
        motion_sampler, motion_steps and motion_guidance, when given, are the motion model's own. guided_steps
        and motion_guided_steps: guidance on only that many of each model's first (noisiest) steps (None: all).
        motion_final_t: the last timestep of the motion model's step grid (None: the trailing grid's).
        values["es_phase"], when given (with weights whose priors have an ES phase anchor): the motion model's
        cycle is warped (cine.priors.warp_phases) so that its ES, at the anchor phase, comes at es_phase.
        """
        motion_sampler, motion_steps = motion_sampler or sampler, motion_steps or steps
        motion_guidance = guidance if motion_guidance is None else motion_guidance
        static_cond, motion_cond = ({k: v.to(self.device) for k, v in cond_tensors([values], norm, self.dx_vocab).items()}
                                    for norm in (self.static_norm, self.motion_norm))
        generator = torch.Generator().manual_seed(int(seed))
        clock = time.perf_counter()
        z_ed = self.sample_static(static_cond, generator, steps, guidance, sampler, guided_steps)
        t1 = time.perf_counter()
        if values.get("es_phase") is not None and self.priors.get("es_phase"):
            phases = warp_phases(phases, values["es_phase"], self.priors["es_phase"]["anchor"])
        if 0 < keyframes < len(phases):
            keys = self.sample_motion(z_ed, n_slices, motion_cond, [k / keyframes for k in range(keyframes)],
                                      generator, motion_steps, motion_guidance, motion_sampler,
                                      motion_guided_steps, motion_final_t)                  # (K, C, X, Y, Z)
            z = z_ed + periodic_interpolate(keys - z_ed, phases)                          # (T, C, X, Y, Z)
        else:
            z = self.sample_motion(z_ed, n_slices, motion_cond, phases, generator, motion_steps, motion_guidance,
                                   motion_sampler, motion_guided_steps, motion_final_t)
        t2 = time.perf_counter()
        image, labels = self.decode(z)
        if timings is not None:
            for k, v in (("static", t1 - clock), ("motion", t2 - t1), ("decode", time.perf_counter() - t2)):
                timings[k] = timings.get(k, 0.0) + v
        return image, labels


@torch.no_grad()
def encode_frames(vae: VAE, frames: torch.Tensor, device, batch: int = 8) -> torch.Tensor:
    """Frames (N, 1, X, Y, Z) -> posterior means (N, C, x, y, Z) float32 on the CPU, `batch` frames at a time."""
    means = []
    for chunk in frames.split(batch):
        with autocast(device):
            means.append(vae.encode(chunk.to(device)).mode().float().cpu())
    return torch.cat(means)


@torch.no_grad()
def reconstruct(vae: VAE, image4d: np.ndarray, device, batch: int = 8):
    """(X, Y, Z, T) cine -> reconstructed (X, Y, Z, T) image and (C, X, Y, Z, T) probabilities, from posterior modes."""
    frames = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image4d, 3, 0)))[:, None]  # (T, 1, X, Y, Z)
    images, probs = [], []
    for chunk in frames.split(batch):
        with autocast(device):
            z = vae.encode(chunk.to(device)).mode()
            image, logits = vae.decode(z, size=chunk.shape[2:4])
        images.append(image.float()[:, 0].cpu())
        probs.append(logits.float().softmax(dim=1).cpu())
    image = torch.cat(images).permute(1, 2, 3, 0).numpy()                                   # (X, Y, Z, T)
    prob = torch.cat(probs).permute(1, 2, 3, 4, 0).numpy()                                  # (C, X, Y, Z, T)
    return image, prob


def reconstruct_frames(vae: VAE, prepared, device, frames=None):
    """A prepared subject (cine.prep.Prepared) through the VAE, frame by frame (default: every frame), real
    slices only -> per frame (t, image (X, Y, n), predicted labels (X, Y, n), true labels (X, Y, n) or None,
    "labelled" for a frame with a training label, "unlabelled" for one with only a full-cycle truth, or None)."""
    frames = list(range(prepared.image.shape[3])) if frames is None else list(frames)
    n = prepared.n_slices
    image, prob = reconstruct(vae, prepared.image[..., frames], device)
    pred = prob.argmax(axis=0).astype(np.uint8)                                             # (X, Y, Z, len(frames))
    for i, t in enumerate(frames):
        if t in prepared.masks:
            truth, kind = prepared.masks[t][:, :, :n], "labelled"
        elif prepared.full_mask is not None:
            truth, kind = prepared.full_mask[:, :, :n, t], "unlabelled"
        else:
            truth, kind = None, None
        yield t, image[:, :, :n, i], pred[:, :, :n, i], truth, kind
