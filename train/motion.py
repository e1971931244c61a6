"""Stage 3: the motion LDM — the residual latent z_t - z_ED of every cardiac phase.

Inputs: the noisy residual and the motion context (the subject's z_ED and its slice mask,
nets.conditions.motion_context, built the same way as in generation). Conditions: the cardiac phase
(continuous, ED = 0), the diagnosis and the systolic priors (nets.conditions.MOTION), each droppable.
Residuals are rescaled to unit standard deviation (the measured factor is stored in the checkpoint).
A batch holds FRAMES random frames of each of B / FRAMES random subjects.
Tensor axes: (B, C, X, Y, Z) latents, B = subjects * FRAMES.
"""
from __future__ import annotations

import numpy as np
import torch

from synth4d.nets.conditions import cond_tensors, motion_context
from synth4d.train.ldm import train_ldm

FRAMES = 4


class MotionTask:
    stage = "motion"

    def __init__(self):
        self.residual_scale = 1.0

    def fit(self, subjects):
        """Measure 1 / std of the residuals over the training subjects' real slices."""
        res = np.concatenate([(s.z - s.z[s.ed])[..., :s.n_slices].ravel() for s in subjects])
        self.residual_scale = float(1.0 / max(res.std(), 1e-6))

    def meta(self) -> dict:
        return {"residual_scale": self.residual_scale, "frames_per_subject": FRAMES}

    def load_meta(self, meta: dict) -> None:
        """Fine-tuning keeps the scale the weights were trained with."""
        self.residual_scale = float(meta["residual_scale"])

    def batch(self, subjects, rng, bs, norm, dx_vocab):
        """Residual latents (B, C, X, Y, Z), their conditions with phase, and their context (B, C + 1, X, Y, Z)."""
        x0, ctx, rows = [], [], []
        for i in rng.indices(len(subjects), max(1, bs // FRAMES)):
            s = subjects[i]
            c = motion_context(torch.from_numpy(s.z[s.ed])[None], s.n_slices)[0]          # (C + 1, X, Y, Z)
            for t in rng.indices(s.frames, FRAMES):
                x0.append(torch.from_numpy((s.z[t] - s.z[s.ed]) * self.residual_scale))
                ctx.append(c)
                rows.append({**s.values(), "phase": ((t - s.ed) % s.frames) / s.frames})
        cond = cond_tensors(rows, norm, dx_vocab)
        cond["phase"] = torch.tensor([r["phase"] for r in rows], dtype=torch.float32)        # (B,)
        return torch.stack(x0), cond, torch.stack(ctx)


def train_motion(data, vae_path, out, **kw) -> str:
    """Train the motion LDM on every frame of `data`, encoded with the VAE at `vae_path`."""
    return train_ldm(MotionTask(), data, vae_path, out, **kw)
