"""Stage 2: the static LDM — end-diastolic anatomy (the latent of the ED frame) from clinical priors.

Conditions: diagnosis, LVEDV, RVEDV, LV mass, slice count and slice thickness (nets.conditions.STATIC);
any of them may be absent (unlabelled subjects train with their volumes absent). The per-diagnosis
prior of the measures is fitted here and stored in the checkpoint, so generation can fill in what a
user omits. Tensor axes: (B, C, X, Y, Z) latents.
"""
from __future__ import annotations

import numpy as np
import torch

from synth4d.nets.conditions import cond_tensors
from synth4d.train.ldm import train_ldm


class StaticTask:
    stage = "static"

    def fit(self, subjects):
        pass

    def meta(self) -> dict:
        return {}

    def load_meta(self, meta: dict) -> None:
        pass

    def batch(self, subjects, rng, bs, norm, dx_vocab):
        """bs random subjects' ED latents (B, C, X, Y, Z) with their conditions; no context."""
        picks = [subjects[i] for i in rng.indices(len(subjects), bs)]
        x0 = torch.from_numpy(np.stack([s.z[s.ed] for s in picks]))                        # (B, C, X, Y, Z)
        return x0, cond_tensors([s.values() for s in picks], norm, dx_vocab), None


def train_static(data, vae_path, out, **kw) -> str:
    """Train the static LDM on the ED frames of `data`, encoded with the VAE at `vae_path`."""
    return train_ldm(StaticTask(), data, vae_path, out, **kw)
