"""The one 3D UNet denoiser shared by the static (ED anatomy) and motion (residual) latent diffusion models.

Axis vocabulary: tensors are (B, C, X, Y, Z); E is the embedding width (cfg.emb_dim), S the number
of scalar conditions.
The network maps (x_t, t, conditions) to a prediction and knows nothing of the noise schedule.

Conditions arrive as the dict of tensors that nets.conditions describes and builds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synth4d.nets.conditions import ConditionEmbedder
from synth4d.nets.config import UNetConfig
from synth4d.nets.layers import Attention, Downsample, ResBlock, Upsample, conv3, mlp, norm, zero_module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps (B,) -> (B, dim), as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                     # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


class UNet(nn.Module):
    """Denoiser: forward(x_t, t, cond, ctx=None) -> prediction (B, out_ch, X, Y, Z)."""

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
            elif isinstance(m, Attention):
                zero_module(m.proj)
        zero_module(self.conv_out)

    def forward(self, x_t, t, cond: dict, ctx=None) -> torch.Tensor:
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

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for j, (res, att) in enumerate(zip(self.up_blocks, self.up_attn)):
            h = att(res(torch.cat([h, skips.pop()], dim=1), emb))
            level, last_in_level = divmod(j, self.cfg.blocks)
            if last_in_level == self.cfg.blocks - 1 and level < len(self.upsample):
                h = self.upsample[level](h)

        out = self.conv_out(F.silu(self.norm_out(h)))                          # (B, out_ch, X', Y', Z')
        return out[:, :, : size[0], : size[1], : size[2]]
