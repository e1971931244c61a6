"""Network configurations: one frozen dataclass per network, presets in a dict.

A preset fixes the training grid (what `cine.prep` resamples to), the VAE and the two
denoisers. Run settings (steps, batch size, learning rate) are CLI options whose defaults
come from `TrainDefaults`. Data-dependent fields (the diagnosis vocabulary, scalar names)
are filled in at training time with `dataclasses.replace` and saved in each checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from synth4d.nets import conditions


@dataclass(frozen=True)
class GridConfig:
    """The fixed training grid: a heart-centred in-plane crop; slices kept, padded to `slices`."""

    spacing: float = 2.2        # in-plane voxel size (mm)
    size: int = 64              # in-plane voxels (X = Y)
    slices: int = 12            # Z after padding; the true slice count is recorded per subject


@dataclass(frozen=True)
class VAEConfig:
    """3D VAE for one frame: in-plane downsampling only (the slice axis is already coarse)."""

    widths: tuple = (16, 32, 64)   # channels per level; len(widths) - 1 in-plane halvings
    latent_ch: int = 4
    n_classes: int = 4             # 0 bg, 1 RV, 2 MYO, 3 LV
    blocks: int = 1                # residual blocks per level
    planar: int = 0                # levels, from the full resolution down, whose convolutions are in-plane (3x3x1)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.widths) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """The one denoiser class used by both latent diffusion models."""

    in_ch: int = 4                 # channels of x_t
    out_ch: int = 4                # channels of the prediction
    ctx_ch: int = 0                # extra context channels concatenated to x_t (motion: z_ED + slice mask)
    widths: tuple = (64, 128)      # channels per level
    down: tuple = ((2, 2, 2),)     # (X, Y, Z) downsampling factor between consecutive levels
    attn: tuple = (False, True)    # self-attention per level (coarse levels only)
    blocks: int = 2                # residual blocks per level
    emb_dim: int = 256             # timestep + condition embedding width
    heads: int = 4
    dx_vocab: tuple = ()           # diagnosis names; index len(dx_vocab) is the null token
    scalars: tuple = ()            # names of scalar conditions, normalised outside the network
    phase: bool = False            # condition on a continuous cardiac phase in [0, 1)
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainDefaults:
    steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class Preset:
    name: str
    grid: GridConfig
    vae: VAEConfig
    static: UNetConfig
    motion: UNetConfig
    train_vae: TrainDefaults
    train_static: TrainDefaults
    train_motion: TrainDefaults

    def latent_shape(self) -> tuple:
        """(C, X, Y, Z) of one frame's latent."""
        f = self.vae.factor
        return (self.vae.latent_ch, self.grid.size // f, self.grid.size // f, self.grid.slices)


def _denoisers(latent_ch, widths, down, attn, emb_dim, blocks=2):
    static = UNetConfig(in_ch=latent_ch, out_ch=latent_ch, widths=widths, down=down, attn=attn,
                        emb_dim=emb_dim, blocks=blocks, scalars=conditions.STATIC)
    motion = dataclasses.replace(static, ctx_ch=latent_ch + 1, scalars=conditions.MOTION, phase=True)
    return static, motion


PRESETS = {}


def _add(name, grid, vae, unet_kw, tv, ts, tm):
    static, motion = _denoisers(vae.latent_ch, **unet_kw)
    PRESETS[name] = Preset(name, grid, vae, static, motion, tv, ts, tm)


_add("tiny", GridConfig(spacing=6.0, size=24, slices=12), VAEConfig(widths=(8, 16), latent_ch=2),
     dict(widths=(16, 32), down=((2, 2, 2),), attn=(False, True), emb_dim=32, blocks=1),
     TrainDefaults(20, 2, 1e-3), TrainDefaults(20, 4, 1e-3), TrainDefaults(20, 4, 1e-3))
# cpu: a 144 mm heart-centred crop at 1.5 mm (real cine pixels are 1.2-1.8 mm; at 2.2 mm the RV free
# wall and the myocardium were 2-3 pixels wide) -> latent 4 x 24 x 24 x 12. The VAE's two finest levels
# convolve in-plane only (planar=2): 1.7x the time of a training step on the 64 x 64 grid at 2.2 mm of
# the first shipped weights instead of 2.3x. The denoisers spend their width at the coarse levels,
# where positions are few.
_add("cpu", GridConfig(spacing=1.5, size=96, slices=12), VAEConfig(widths=(12, 24, 48), latent_ch=4, planar=2),
     dict(widths=(32, 64, 96), down=((2, 2, 1), (2, 2, 2)), attn=(False, False, True), emb_dim=128, blocks=1),
     TrainDefaults(1500, 4, 1e-3), TrainDefaults(1800, 8, 5e-4), TrainDefaults(1800, 8, 5e-4))
_add("paper", GridConfig(spacing=1.0, size=192, slices=16), VAEConfig(widths=(64, 128, 256, 256), latent_ch=8, blocks=2),
     dict(widths=(192, 384, 768), down=((2, 2, 1), (2, 2, 2)), attn=(False, True, True), emb_dim=768),
     TrainDefaults(100000, 8, 1e-4), TrainDefaults(200000, 32, 1e-4), TrainDefaults(200000, 16, 1e-4))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
