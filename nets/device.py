"""Which device the networks run on, and the mixed precision they use there."""
from __future__ import annotations

import contextlib

import torch

from synth4d.cine import UserError


def select_device(name: str) -> torch.device:
    """torch.device from a CLI string; a clear UserError when the device is unknown or absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} requested but MPS is not available on this machine; use --device cpu")
    return device


def autocast(device):
    """bf16 autocast on CUDA, where it speeds convolutions up; a no-op elsewhere (CPU bf16 is slower)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
