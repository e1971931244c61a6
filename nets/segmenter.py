"""A compact 2D UNet segmenter: the independent judge of `synth4d eval --realism` and `--downstream`.

It never shares weights with the VAE or the denoisers: it learns from labelled short-axis slices
alone, so its Dice on an image says whether the image shows the structures its mask says, not
whether our own models agree with themselves. It is deliberately small (about 0.5 M parameters
at width 16) so that one fit takes minutes on a CPU; it is not nnU-Net and makes no claim to its
accuracy.

Axis vocabulary: slices (B, 1, X, Y) in [-1, 1]; logits (B, C, X, Y) with C = 4 classes
(0 background, 1 RV, 2 MYO, 3 LV). X and Y must be multiples of 2 ** levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 4


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Conv-GroupNorm-SiLU, twice."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(min(8, out_ch), out_ch), nn.SiLU(),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.GroupNorm(min(8, out_ch), out_ch), nn.SiLU())


class Segmenter2D(nn.Module):
    """UNet with `levels` downsamplings, widths width * 2^i, skip connections by concatenation."""

    def __init__(self, width: int = 16, levels: int = 3, classes: int = CLASSES):
        super().__init__()
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.levels = levels
        self.down = nn.ModuleList([_block(1, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels)])
        self.merge = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in range(levels)])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 ** self.levels or x.shape[-2] % 2 ** self.levels:
            raise ValueError(f"slice size {tuple(x.shape[-2:])} is not a multiple of {2 ** self.levels}")
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(self.levels)):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return self.head(h)
