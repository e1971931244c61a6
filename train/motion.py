"""Stage 3: the motion LDM — the residual latent z_t - z_ED of every cardiac phase.

Inputs: the noisy residual, the subject's z_ED and its slice mask as context channels.
Conditions: the cardiac phase (continuous, ED = 0), the diagnosis and the systolic priors
(LVESV, LVEF, RVESV, RVEF), each droppable. Residuals are rescaled to unit standard deviation
(the measured factor is stored in the checkpoint). A batch holds FRAMES frames of each of
B / FRAMES subjects, consecutive, so a temporal layer (UNetConfig.temporal) can mix them.
Tensor axes: (B, C, X, Y, Z) latents, B = subjects * FRAMES.
"""
from __future__ import annotations

import numpy as np
import torch

from train.ldm import cond_tensors, train_ldm

FRAMES = 4


def context(z_ed: np.ndarray, n_slices: int) -> np.ndarray:
    """(C, X, Y, Z) ED latent -> (C + 1, X, Y, Z) context: the latent and a mask of the real slices."""
    mask = np.zeros((1,) + z_ed.shape[1:], np.float32)
    mask[..., :n_slices] = 1.0
    return np.concatenate([z_ed, mask])


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

    def batch(self, subjects, sampler, bs, norm, dx_vocab):
        n_subj = max(1, bs // FRAMES)
        x0, ctx, rows = [], [], []
        for i in sampler.indices(len(subjects), n_subj):
            s = subjects[i]
            c = context(s.z[s.ed], s.n_slices)
            for t in sampler.indices(s.frames, FRAMES):
                x0.append((s.z[t] - s.z[s.ed]) * self.residual_scale)
                ctx.append(c)
                rows.append({**s.values(), "phase": ((t - s.ed) % s.frames) / s.frames})
        cond = cond_tensors(rows, list(norm), norm, dx_vocab)
        cond["phase"] = torch.tensor([r["phase"] for r in rows], dtype=torch.float32)        # (B,)
        return torch.from_numpy(np.stack(x0)), cond, torch.from_numpy(np.stack(ctx)), FRAMES


def train_motion(data, vae_path, out, **kw) -> str:
    """Train the motion LDM on every frame of `data`, encoded with the VAE at `vae_path`."""
    return train_ldm(MotionTask(), data, vae_path, out, **kw)
