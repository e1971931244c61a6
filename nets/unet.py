"""The one 3D UNet denoiser shared by the static (ED anatomy) and motion (residual) latent diffusion models.

Axis vocabulary: tensors are (B, C, X, Y, Z); E is the embedding width (cfg.emb_dim), S the number
of scalar conditions, F the frames of one subject when the batch holds B = subjects * F frames.
The network maps (x_t, t, conditions) to a prediction and knows nothing of the noise schedule.

Conditions arrive as a dict:
    dx       (B,)   long   index into cfg.dx_vocab; len(cfg.dx_vocab) is the null token
    scalars  (B, S) float  already normalised
    present  (B, S) bool   an absent scalar contributes only its learned 'absent' embedding
    phase    (B,)   float  cardiac phase in [0, 1), only when cfg.phase
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nets.config import UNetConfig
from nets.layers import Attention, Downsample, ResBlock, Upsample, conv3, norm, zero_module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps (B,) -> (B, dim), as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                     # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


def fourier_features(x: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B,) -> (B, 2n + 1): the value and its sin/cos at octave frequencies, so a small MLP can resolve it."""
    freqs = 2.0 ** torch.arange(n, device=x.device, dtype=torch.float32)
    args = x.float()[:, None] * freqs                           # (B, n)
    return torch.cat([x.float()[:, None], torch.sin(args), torch.cos(args)], dim=1)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class ConditionEmbedder(nn.Module):
    """Sums the embeddings of diagnosis, scalar conditions and phase into one (B, E) vector."""

    def __init__(self, cfg: UNetConfig):
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


class TemporalAttention(nn.Module):
    """Residual self-attention across the F frames of one subject at each position; starts as the identity."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        B, C, X, Y, Z = x.shape
        if B % frames:
            raise ValueError(f"batch {B} is not a whole number of subjects of {frames} frames")
        h = rearrange(self.norm(x), "(b f) c x y z -> (b x y z) f c", f=frames)
        q, k, v = rearrange(self.qkv(h), "n f (three h d) -> three n h f d", three=3, h=self.heads)
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "n h f d -> n f (h d)")
        h = rearrange(self.proj(h), "(b x y z) f c -> (b f) c x y z", x=X, y=Y, z=Z)
        return x + h


class UNet(nn.Module):
    """Denoiser: forward(x_t, t, cond, ctx=None, frames=None) -> prediction (B, out_ch, X, Y, Z)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not (len(cfg.widths) == len(cfg.attn) == len(cfg.down) + 1):
            raise ValueError("UNetConfig needs len(widths) == len(attn) == len(down) + 1")
        self.cfg = cfg
        E, w = cfg.emb_dim, cfg.widths
        block = lambda i, o: ResBlock(i, o, E, cfg.dropout)  # noqa: E731
        attn = lambda on, ch: Attention(ch, cfg.heads) if on else nn.Identity()  # noqa: E731
        # Sizes must divide the product of the factors per axis; forward pads up to that multiple.
        self.multiple = tuple(math.prod(f[a] for f in cfg.down) for a in range(3))

        self.time_embed = mlp(w[0], E, E)
        self.cond_embed = ConditionEmbedder(cfg)
        self.conv_in = conv3(cfg.in_ch + cfg.ctx_ch, w[0])

        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch, skips = w[0], []
        for i, width in enumerate(w):
            for _ in range(cfg.blocks):
                self.down_blocks.append(block(ch, width))
                self.down_attn.append(attn(cfg.attn[i], width))
                ch = width
                skips.append(ch)
            if i < len(cfg.down):
                self.downsample.append(Downsample(ch, cfg.down[i]))

        self.mid1, self.mid_attn, self.mid2 = block(ch, ch), Attention(ch, cfg.heads), block(ch, ch)
        self.temporal = TemporalAttention(ch, cfg.heads) if cfg.temporal else None

        self.up_blocks, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(w))):
            for _ in range(cfg.blocks):
                self.up_blocks.append(block(ch + skips.pop(), w[i]))
                self.up_attn.append(attn(cfg.attn[i], w[i]))
                ch = w[i]
            if i > 0:
                self.upsample.append(Upsample(ch, cfg.down[i - 1]))

        self.norm_out = norm(ch)
        self.conv_out = conv3(ch, cfg.out_ch)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier for convs and linears, small normal embeddings, and zero every residual branch's last layer
        and the output conv, so the network starts as identity branches and predicts exactly zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.cond_embed.absent, std=0.02)
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_module(m.conv2)
            elif isinstance(m, (Attention, TemporalAttention)):
                zero_module(m.proj)
        zero_module(self.conv_out)

    def drop_conditions(self, cond: dict, p_all: float, p_each: float, generator=None) -> dict:
        """Classifier-free guidance dropout for training: with prob p_all the diagnosis becomes null and
        every scalar absent; independently each scalar and the diagnosis are dropped with prob p_each.
        Phase is never dropped (it says which frame is asked for, not how the subject looks)."""
        dx, present = cond["dx"], cond["present"]
        B, S = present.shape
        rand = lambda *shape: torch.rand(shape, generator=generator, device=dx.device)  # noqa: E731
        drop_all = rand(B) < p_all                                             # (B,)
        null_dx = drop_all | (rand(B) < p_each)                                # (B,)
        absent = drop_all[:, None] | (rand(B, S) < p_each)                      # (B, S)
        return {**cond, "dx": torch.where(null_dx, torch.full_like(dx, self.cond_embed.null_dx), dx),
                "present": present & ~absent}

    def null_conditions(self, cond: dict) -> dict:
        """The unconditional branch of guidance: null diagnosis, no scalar present, phase kept."""
        return {**cond, "dx": torch.full_like(cond["dx"], self.cond_embed.null_dx),
                "present": torch.zeros_like(cond["present"])}

    def forward(self, x_t, t, cond: dict, ctx=None, frames: int | None = None) -> torch.Tensor:
        if self.cfg.ctx_ch:
            x_t = torch.cat([x_t, ctx], dim=1)                                 # (B, in_ch + ctx_ch, X, Y, Z)
        size = x_t.shape[2:]
        pad = [(-n) % m for n, m in zip(size, self.multiple)]                  # per axis (X, Y, Z)
        x = F.pad(x_t, (0, pad[2], 0, pad[1], 0, pad[0]))                      # (B, C, X', Y', Z')

        emb = self.time_embed(timestep_embedding(t, self.cfg.widths[0])) + self.cond_embed(cond)  # (B, E)
        h = self.conv_in(x)
        skips = []
        for j, (res, att) in enumerate(zip(self.down_blocks, self.down_attn)):
            h = att(res(h, emb))
            skips.append(h)
            level, last_in_level = divmod(j, self.cfg.blocks)
            if last_in_level == self.cfg.blocks - 1 and level < len(self.downsample):
                h = self.downsample[level](h)

        h = self.mid_attn(self.mid1(h, emb))
        if self.temporal is not None and frames is not None:
            h = self.temporal(h, frames)
        h = self.mid2(h, emb)

        for j, (res, att) in enumerate(zip(self.up_blocks, self.up_attn)):
            h = att(res(torch.cat([h, skips.pop()], dim=1), emb))
            level, last_in_level = divmod(j, self.cfg.blocks)
            if last_in_level == self.cfg.blocks - 1 and level < len(self.upsample):
                h = self.upsample[level](h)

        out = self.conv_out(F.silu(self.norm_out(h)))                          # (B, out_ch, X', Y', Z')
        return out[:, :, : size[0], : size[1], : size[2]]
