"""Conditions: what each denoiser is conditioned on, how values become the tensors it reads, and the
embedding that turns those tensors into one vector.

A request is a dict of condition values (missing or None = absent): "dx" (a diagnosis name) and
scalars, which are clinical measures (cine.measures.MEASURES) or acquisition figures (slice count,
slice thickness). The static model reads STATIC, the motion model MOTION plus the cardiac phase.
Scalars are normalised per checkpoint, (value - mean) / std over the training subjects (`normaliser`,
stored in the checkpoint as "norm"), and reach the network as a dict of tensors:

    dx       (B,)   long   index into the diagnosis vocabulary; len(vocabulary) is the null token
    scalars  (B, S) float  normalised values, 0 where absent
    present  (B, S) bool   an absent scalar contributes only its learned 'absent' embedding
    phase    (B,)   float  cardiac phase in [0, 1), ED = 0 (motion only)

The motion model also reads a context of extra input channels: the subject's ED latent and a mask of
its real slices (`motion_context`), the same in training and in generation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from synth4d.nets.layers import mlp

STATIC = ("lvedv", "rvedv", "lv_mass", "slices", "slice_mm")
MOTION = ("lvesv", "lvef", "rvesv", "rvef")


def normaliser(rows, names) -> dict:
    """name -> (mean, std) of the condition over the rows that have it (std floored at 1e-3)."""
    out = {}
    for n in names:
        v = np.array([r[n] for r in rows if r.get(n) is not None], dtype=float)
        out[n] = (float(v.mean()), float(max(v.std(), 1e-3))) if len(v) else (0.0, 1.0)
    return out


def cond_tensors(rows, norm, dx_vocab) -> dict:
    """Requests (dicts) -> dx (B,), scalars (B, S), present (B, S), for the scalars named in `norm`."""
    names, null = list(norm), len(dx_vocab)
    dx = torch.tensor([dx_vocab.index(r["dx"]) if r.get("dx") in dx_vocab else null for r in rows])
    present = torch.tensor([[r.get(n) is not None and math.isfinite(r[n]) for n in names] for r in rows])
    scalars = torch.tensor([[(r[n] - norm[n][0]) / norm[n][1] if p else 0.0 for n, p in zip(names, ps)]
                            for r, ps in zip(rows, present.tolist())], dtype=torch.float32)
    B, S = len(rows), len(names)
    return {"dx": dx.long(), "scalars": scalars.reshape(B, S), "present": present.reshape(B, S)}


def drop_conditions(cond: dict, null_dx: int, p_all: float, p_each: float, generator=None) -> dict:
    """Classifier-free guidance dropout for training: with prob p_all the diagnosis becomes null and
    every scalar absent; independently each scalar and the diagnosis are dropped with prob p_each.
    Phase is never dropped (it says which frame is asked for, not how the subject looks)."""
    dx, present = cond["dx"], cond["present"]
    B, S = present.shape
    rand = lambda *shape: torch.rand(shape, generator=generator, device=dx.device)  # noqa: E731
    drop_all = rand(B) < p_all                                             # (B,)
    null = drop_all | (rand(B) < p_each)                                   # (B,)
    absent = drop_all[:, None] | (rand(B, S) < p_each)                     # (B, S)
    return {**cond, "dx": torch.where(null, torch.full_like(dx, null_dx), dx), "present": present & ~absent}


def null_conditions(cond: dict, null_dx: int) -> dict:
    """The unconditional branch of guidance: null diagnosis, no scalar present, phase kept."""
    return {**cond, "dx": torch.full_like(cond["dx"], null_dx), "present": torch.zeros_like(cond["present"])}


def motion_context(z_ed: torch.Tensor, n_slices: int) -> torch.Tensor:
    """ED latent (B, C, X, Y, Z) -> context (B, C + 1, X, Y, Z): the latent and a mask of the real slices."""
    mask = torch.zeros((z_ed.shape[0], 1) + tuple(z_ed.shape[2:]), dtype=z_ed.dtype, device=z_ed.device)
    mask[..., :n_slices] = 1.0
    return torch.cat([z_ed, mask], dim=1)


def fourier_features(x: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B,) -> (B, 2n + 1): the value and its sin/cos at octave frequencies, so a small MLP can resolve it."""
    freqs = 2.0 ** torch.arange(n, device=x.device, dtype=torch.float32)
    args = x.float()[:, None] * freqs                           # (B, n)
    return torch.cat([x.float()[:, None], torch.sin(args), torch.cos(args)], dim=1)


class ConditionEmbedder(nn.Module):
    """Sums the embeddings of diagnosis, scalar conditions and phase into one (B, E) vector."""

    def __init__(self, cfg):
        super().__init__()
        E = cfg.emb_dim
        self.null_dx = len(cfg.dx_vocab)
        self.dx = nn.Embedding(len(cfg.dx_vocab) + 1, E)
        # One small MLP per scalar: measures on different scales should not share features.
        self.scalars = nn.ModuleList(mlp(9, 64, E) for _ in cfg.scalars)
        self.absent = nn.Parameter(torch.zeros(len(cfg.scalars), E))  # (S, E)
        self.phase = mlp(8, E, E) if cfg.phase else None

    def forward(self, cond: dict) -> torch.Tensor:
        e = self.dx(cond["dx"])                                     # (B, E)
        if len(self.scalars):
            present = cond["present"]                               # (B, S)
            # Zero absent values first: a NaN placeholder would otherwise turn the MLP's gradients into NaN.
            values = torch.where(present, cond["scalars"], torch.zeros_like(cond["scalars"]))
            for s, embed in enumerate(self.scalars):
                here = present[:, s, None]                           # (B, 1)
                e = e + torch.where(here, embed(fourier_features(values[:, s])), self.absent[s])
        if self.phase is not None:
            # sin/cos of 2*pi*k*phase: the embedding of phase 0.99 is next to that of phase 0.
            k = torch.arange(1, 5, device=e.device, dtype=torch.float32)
            args = 2 * math.pi * cond["phase"].float()[:, None] * k  # (B, 4)
            e = e + self.phase(torch.cat([torch.sin(args), torch.cos(args)], dim=1))
        return e
