"""Semi-supervised 3D VAE for one cine frame: encodes the image, decodes image + 4-class mask.

Axis vocabulary: tensors are (B, C, X, Y, Z) — batch, channels, in-plane X and Y, slice Z.
A frame is (B, 1, X, Y, Z) with intensities in [-1, 1]; its latent is (B, latent_ch, X / f, Y / f, Z)
with f = cfg.factor. Only the in-plane axes are downsampled: the slice axis is already coarse
(8-10 mm) and has few slices.

Two decoders read the same latent: one for the image, one for the mask logits. A shared trunk
with two heads was the default choice, but in a short run on the phantom (cpu preset, 150 steps,
batch 4, 18 training subjects) two decoders reconstructed much better at the same step
(held-out PSNR 19.2 vs 15.0 dB, SSIM 0.48 vs 0.30) with no worse masks (Dice on labelled frames
0.64 vs 0.59, on never-labelled frames 0.66 vs 0.62), for about 1.2x the time per step: the
narrow full-resolution trunk could not serve both the segmentation and the image losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from synth4d.nets.config import VAEConfig
from synth4d.nets.layers import Downsample, ResBlock, Upsample, conv3, norm, zero_module

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in fp32 and bf16


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)                # (B, latent_ch, x, y, Z) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * eps, eps from `noise` when given (the caller's draw), else drawn here."""
        eps = noise.to(self.mean) if noise is not None else torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3, 4))


def _levels(ch: int, widths, blocks: int, resample, kernels) -> tuple[list, int]:
    """cfg.blocks ResBlocks per level of `widths`, with `resample` (in-plane x2) between levels -> (layers, channels).
    kernels[i]: the convolution kernel of level i's blocks."""
    layers = []
    for i, width in enumerate(widths):
        for _ in range(blocks):
            layers.append(ResBlock(ch, width, kernel=kernels[i]))
            ch = width
        if i < len(widths) - 1:
            layers.append(resample(ch, (2, 2, 1)))
    return layers, ch


def _kernels(cfg: VAEConfig) -> list:
    """Per level from the full resolution: in-plane kernels on the first cfg.planar levels.

    The slices are 5-10 mm apart against 1-2 mm pixels: at full resolution a 3x3x3 kernel spends two
    thirds of its arithmetic across slices, where the coarser levels mix them as well.
    """
    return [(3, 3, 1) if i < cfg.planar else (3, 3, 3) for i in range(len(cfg.widths))]


class Encoder(nn.Module):
    """Frame (B, 1, X, Y, Z) -> posterior moments (B, 2 * latent_ch, X / f, Y / f, Z)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, kernels = cfg.widths, _kernels(cfg)
        self.conv_in = conv3(1, w[0], kernel=kernels[0])
        layers, ch = _levels(w[0], w, cfg.blocks, Downsample, kernels)
        # No self-attention: at the lowest level the cpu grid still has 16 x 16 x 12 positions,
        # where attention costs more than the whole encoder; one more block mixes context instead.
        layers.append(ResBlock(ch, ch))
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv3d(ch, 2 * cfg.latent_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.conv_in(x)))


class Decoder(nn.Module):
    """Latent (B, latent_ch, x, y, Z) -> (B, out_ch, f x, f y, Z): the image (out_ch 1) or mask logits."""

    def __init__(self, cfg: VAEConfig, out_ch: int):
        super().__init__()
        w = cfg.widths[::-1]
        ch = w[0]
        self.conv_in = nn.Conv3d(cfg.latent_ch, ch, 3, padding=1)
        first = ResBlock(ch, ch)
        kernels = _kernels(cfg)
        layers, ch = _levels(ch, w, cfg.blocks, Upsample, kernels[::-1])
        self.body = nn.Sequential(first, *layers)
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(conv3(ch, out_ch, kernel=kernels[0])))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.conv_in(z)))


class VAE(nn.Module):
    """Image + mask VAE. In-plane sizes that are not a multiple of cfg.factor are padded, then cropped back."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        # Linear image output: the data already lie in [-1, 1] and L1 does not need tanh's squashing,
        # which would slow the learning of the saturated background (-1).
        self.image_decoder = Decoder(cfg, 1)
        self.mask_decoder = Decoder(cfg, cfg.n_classes)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 1, X, Y, Z) in [-1, 1] -> posterior over (B, latent_ch, ceil(X / f), ceil(Y / f), Z)."""
        f = self.cfg.factor
        px, py = -x.shape[2] % f, -x.shape[3] % f
        if px or py:
            # Replicate the border (background near -1) rather than zero-padding, which would be mid-grey.
            x = F.pad(x, (0, 0, 0, py, 0, px), mode="replicate")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor, size: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, latent_ch, x, y, Z) -> image (B, 1, X, Y, Z), logits (B, n_classes, X, Y, Z).

        size: the (X, Y) to crop back to when the frame was padded in `encode`.
        """
        image, logits = self.image_decoder(z), self.mask_decoder(z)
        if size is not None:
            image, logits = image[:, :, :size[0], :size[1]], logits[:, :, :size[0], :size[1]]
        return image, logits

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
        """x (B, 1, X, Y, Z) -> (image (B, 1, X, Y, Z), logits (B, n_classes, X, Y, Z), posterior);
        noise: the posterior sample's standard normal draw (B, latent_ch, x, y, Z), if the caller makes it."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        image, logits = self.decode(z, size=x.shape[2:4])
        return image, logits, posterior


class PatchDiscriminator(nn.Module):
    """Training-only critic of in-plane slices: (N, 1, X, Y) -> (N, 1, X / 8, Y / 8) realism scores.

    A PatchGAN (Isola et al. 2017, as in the adversarial VAE losses of Esser et al. 2021 and latent
    diffusion): three strided 4x4 convolutions and a 3x3 head, each score seeing a patch of about 38
    pixels, so it judges texture and edges, not whole hearts. Not part of the shipped weights.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        layers, ch = [], 1
        for i, out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1)]
            layers += [nn.GroupNorm(8, out)] if i else []
            layers += [nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
