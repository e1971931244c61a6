"""Inception-I3D (Carreira & Zisserman 2017), the feature network of the Fréchet video distance.

Axis vocabulary: a batch of clips is (B, C, T, H, W) — batch, colour channels (3), time, height,
width; intensities in [-1, 1] (the Kinetics training range). The FVD feature is the 400-d
Kinetics logits averaged over time (B, 400), as in the reference TensorFlow FVD.

The module reproduces piergiaj/pytorch-i3d `InceptionI3d` layer for layer, with its state dict
names (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b0.conv3d.weight`, `logits.conv3d.bias`, ...),
so its converted Kinetics-400 weights load as they are. No weights ship or download here:
`load_i3d` reads a file the user supplies, either such a state dict or a TorchScript export
called the way StyleGAN-V's FVD calls `i3d_torchscript.pt`:
`detector(videos, rescale=False, resize=False, return_features=True)` on float clips already
resized to 224 x 224 and scaled to [-1, 1]. `InceptionI3d.forward` has that same signature, so
`torch.jit.script(model)` writes a file of the same kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 400  # Kinetics-400
SIZE = 224       # the resolution I3D was trained at


def _same_pad(x: torch.Tensor, kernel: List[int], stride: List[int]) -> torch.Tensor:
    """TensorFlow 'SAME' padding of a (B, C, T, H, W) tensor, the extra voxel at the end (as piergiaj)."""
    pad: List[int] = []
    for dim in (2, 1, 0):  # F.pad lists the last axis (W) first
        s = x.shape[dim + 2]
        total = max(kernel[dim] - (stride[dim] if s % stride[dim] == 0 else s % stride[dim]), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class MaxPoolSame(nn.Module):
    """Max pooling with 'SAME' zero padding; it always follows a ReLU, so zeros never win over data."""

    def __init__(self, kernel: List[int], stride: List[int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """'SAME'-padded Conv3d, then BatchNorm (eps 1e-3) and ReLU; the logits unit has a bias and neither."""

    def __init__(self, in_ch: int, out_ch: int, kernel: List[int], stride: List[int] = (1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride = list(kernel), list(stride)
        self.conv3d = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=logits)
        self.bn = nn.Identity() if logits else nn.BatchNorm3d(out_ch, eps=1e-3, momentum=0.01)
        self.relu = not logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv3d(_same_pad(x, self.kernel, self.stride)))
        return F.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1."""

    def __init__(self, in_ch: int, c: List[int]):
        super().__init__()
        self.b0 = Unit3D(in_ch, c[0], [1, 1, 1])
        self.b1a, self.b1b = Unit3D(in_ch, c[1], [1, 1, 1]), Unit3D(c[1], c[2], [3, 3, 3])
        self.b2a, self.b2b = Unit3D(in_ch, c[3], [1, 1, 1]), Unit3D(c[3], c[4], [3, 3, 3])
        self.b3a, self.b3b = MaxPoolSame([3, 3, 3], [1, 1, 1]), Unit3D(in_ch, c[5], [1, 1, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, in_ch, branch widths) of the inception modules, in order; max pools sit before 3b, 4b and 5b.
_MIXED = (("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]), ("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
          ("Mixed_4b", 480, [192, 96, 208, 16, 48, 64]), ("Mixed_4c", 512, [160, 112, 224, 24, 64, 64]),
          ("Mixed_4d", 512, [128, 128, 256, 24, 64, 64]), ("Mixed_4e", 512, [112, 144, 288, 32, 64, 64]),
          ("Mixed_4f", 528, [256, 160, 320, 32, 128, 128]), ("Mixed_5b", 832, [256, 160, 320, 32, 128, 128]),
          ("Mixed_5c", 832, [384, 192, 384, 48, 128, 128]))


class InceptionI3d(nn.Module):
    """Inception-v1 I3D, eval-only (no dropout): clips (B, 3, T, H, W) -> logits or class probabilities."""

    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        layers = [("Conv3d_1a_7x7", Unit3D(3, 64, [7, 7, 7], [2, 2, 2])),
                  ("MaxPool3d_2a_3x3", MaxPoolSame([1, 3, 3], [1, 2, 2])),
                  ("Conv3d_2b_1x1", Unit3D(64, 64, [1, 1, 1])),
                  ("Conv3d_2c_3x3", Unit3D(64, 192, [3, 3, 3])),
                  ("MaxPool3d_3a_3x3", MaxPoolSame([1, 3, 3], [1, 2, 2]))]
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", MaxPoolSame([3, 3, 3], [2, 2, 2])),
                 "Mixed_5b": ("MaxPool3d_5a_2x2", MaxPoolSame([2, 2, 2], [2, 2, 2]))}
        for name, in_ch, widths in _MIXED:
            if name in pools:
                layers.append(pools[name])
            layers.append((name, InceptionModule(in_ch, widths)))
        # Registered as attributes (not a container) so the state dict keys are piergiaj's.
        for name, layer in layers:
            self.add_module(name, layer)
        self.logits = Unit3D(1024, n_classes, [1, 1, 1], logits=True)
        self.size = SIZE

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        """x (B, 3, T, H, W) -> time-averaged logits (B, n_classes) with return_features, else softmax.

        rescale: x is in [0, 255] and is mapped to [-1, 1]; resize: frames are resized to 224 x 224
        (bilinear); both as the StyleGAN-V TorchScript detector takes them.
        """
        if rescale:
            x = x.float() / 127.5 - 1.0
        if resize:
            b, c, t = x.shape[0], x.shape[1], x.shape[2]
            frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, x.shape[3], x.shape[4])   # (B T, C, H, W)
            size: int = self.size
            frames = F.interpolate(frames, size=[size, size], mode="bilinear", align_corners=False)
            x = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)                # (B, C, T, 224, 224)
        for name, layer in self.named_children():
            if name != "logits":
                x = layer(x)
        # I3D's 2 x 7 x 7 average pool (stride 1); at 224 x 224 and 16 frames it spans the whole
        # Mixed_5c map. Clipped to the map so that tests can run on small clips.
        window = [min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4])]
        x = self.logits(F.avg_pool3d(x, window, stride=1))                                # (B, K, T', H', W')
        x = x.mean(dim=(2, 3, 4))                                                         # (B, K)
        return x if return_features else x.softmax(dim=1)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with the model's code in them; torch.save files have none."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in f"/{n}" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _piergiaj_state(obj) -> dict:
    """The tensor dict inside a saved file: a bare state dict, {'state_dict': ...}, 'module.' prefixes stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


class I3DFeatures:
    """Callable: clips (B, 3, T, 224, 224) in [-1, 1] -> (B, 400) float32 time-averaged Kinetics logits."""

    def __init__(self, net, kind: str, device):
        self.net, self.kind, self.device = net, kind, device

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net(clips.to(self.device), rescale=False, resize=False, return_features=True).float().cpu()

    def grey_clips(self, clips: torch.Tensor, size: int = SIZE, batch: int = 8) -> torch.Tensor:
        """Grey clips (N, T, H, W) in [-1, 1] -> (N, 400): frames resized to size x size (bilinear; size is
        224 but for tests), the grey channel repeated as RGB, in batches of `batch` clips."""
        out = []
        for chunk in clips.float().split(batch):
            b, t = chunk.shape[:2]
            x = F.interpolate(chunk.reshape(b * t, 1, *chunk.shape[2:]).to(self.device), size=(size, size),
                              mode="bilinear", align_corners=False)        # (B T, 1, size, size)
            x = x.reshape(b, 1, t, size, size).expand(b, 3, t, size, size)  # (B, 3, T, size, size)
            out.append(self(x.contiguous()))
        return torch.cat(out)


def load_i3d(path, device="cpu", allow_torchscript: bool = False) -> I3DFeatures:
    """Load I3D weights from a piergiaj state dict or, with allow_torchscript, a TorchScript export
    (StyleGAN-V's i3d_torchscript.pt): loading TorchScript runs code from the file, so it is opt-in.

    Raises cine.DataError naming the file when it is neither, or not a 400-class Kinetics model.
    """
    from synth4d.cine import DataError

    path = Path(path)
    if _is_torchscript(path):
        if not allow_torchscript:
            raise DataError(path, "a TorchScript export, which runs code from the file when loaded; pass "
                                  "--i3d-torchscript if you trust it, or give a state dict")
        try:
            return I3DFeatures(torch.jit.load(str(path), map_location=device).eval(), "torchscript", device)
        except (RuntimeError, ValueError) as e:
            raise DataError(path, f"unreadable TorchScript export ({type(e).__name__})") from None
    try:
        state = _piergiaj_state(torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as e:  # torch.load raises many types for foreign files
        raise DataError(path, f"neither a TorchScript I3D nor a PyTorch I3D state dict ({type(e).__name__})") from None
    weight = state.get("logits.conv3d.weight")
    if weight is None:
        raise DataError(path, "no 'logits.conv3d.weight': not a piergiaj/pytorch-i3d InceptionI3d state dict")
    if weight.shape[0] != N_CLASSES:
        raise DataError(path, f"I3D with {weight.shape[0]} classes; FVD needs the Kinetics-400 model (400)")
    net = InceptionI3d()
    # Older checkpoints lack BatchNorm's num_batches_tracked, which inference never reads.
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise DataError(path, f"state dict does not match InceptionI3d ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {first!r})")
    return I3DFeatures(net.to(device).eval(), "state_dict", device)
