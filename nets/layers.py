"""Building blocks shared by the VAE and the UNet denoiser.

Axis vocabulary: tensors are (B, C, X, Y, Z) — batch, channels, in-plane X and Y, slice Z.
N = X * Y * Z positions, H attention heads, D = C // H channels per head.
Resampling factors are per axis (X, Y, Z), so the coarse slice axis can be left alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_module(m: nn.Module) -> nn.Module:
    """Zero every parameter of `m`, so a residual branch ending in it starts as the identity."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm whose group count divides `ch`: 32 groups for wide layers, at most 8 for narrow ones."""
    return nn.GroupNorm(math.gcd(ch, 32 if ch >= 64 else 8), ch)


class Pointwise(nn.Conv3d):
    """1x1x1 conv (the same parameters as nn.Conv3d(in_ch, out_ch, 1)) that keeps the channels_last_3d layout.

    oneDNN returns a 1x1x1 conv of a channels-last input in the contiguous layout, so the residual sum
    after it mixed layouts and every layer downstream paid a transpose: in the VAE decoder at the cpu
    preset, the two skip convs and the copies they caused took a quarter of its time or more (fp32 and
    bf16, one thread). On a channels-last input the conv is one matmul over the channel axis, which is
    already last in memory.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super().forward(x)
        y = F.linear(x.permute(0, 2, 3, 4, 1), self.weight.flatten(1), self.bias)   # (B, X, Y, Z, out_ch)
        return y.permute(0, 4, 1, 2, 3)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def conv3(in_ch: int, out_ch: int, stride=1, kernel=(3, 3, 3)) -> nn.Conv3d:
    """3x3x3 conv (or `kernel`, odd per axis) keeping the size at stride 1."""
    return nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=tuple(k // 2 for k in kernel))


class ResBlock(nn.Module):
    """Residual block GroupNorm-SiLU-Conv x2, with optional scale/shift modulation by an embedding.

    With emb_dim > 0 the embedding (B, emb_dim) sets a per-channel scale and shift after the
    second norm (adaptive GroupNorm, as in guided-diffusion's `use_scale_shift_norm`).
    The second conv is zero-initialised, so the block starts as its skip path. kernel (3, 3, 1)
    makes an in-plane block: a third of the arithmetic, for levels where the slices are left alone.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int = 0, dropout: float = 0.0, kernel=(3, 3, 3)):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = conv3(in_ch, out_ch, kernel=kernel)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch)) if emb_dim > 0 else None
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv3(out_ch, out_ch, kernel=kernel))
        self.skip = Pointwise(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = self.emb(emb)[:, :, None, None, None].chunk(2, dim=1)  # (B, C, 1, 1, 1) each
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3x3 conv; an axis with factor 1 keeps its size, one with factor 2 becomes ceil(n / 2)."""

    def __init__(self, ch: int, factor=(2, 2, 1), kernel=(3, 3, 3)):
        super().__init__()
        self.conv = conv3(ch, ch, stride=tuple(factor), kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed conv with kernel = stride = `factor` per axis.

    Non-overlapping kernels leave no checkerboard, and it costs what a 1x1x1 conv at the output
    resolution costs: nearest + 3x3x3 conv, the usual choice, was half of the VAE decoder's FLOPs.
    """

    def __init__(self, ch: int, factor=(2, 2, 1)):
        super().__init__()
        self.conv = nn.ConvTranspose3d(ch, ch, kernel_size=tuple(factor), stride=tuple(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Residual multi-head self-attention over all X*Y*Z positions; starts as the identity."""

    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} not divisible by {heads} heads")
        self.heads = heads
        self.norm = norm(ch)
        self.qkv = nn.Conv3d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv3d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, X, Y, Z = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, X * Y * Z)  # (B, 3, H, D, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                                          # (B, H, N, D) each
        h = F.scaled_dot_product_attention(q, k, v)                                        # (B, H, N, D)
        h = h.transpose(-1, -2).reshape(B, C, X, Y, Z)                                     # (B, C, X, Y, Z)
        return x + self.proj(h)
