"""Which device the networks run on, and the mixed precision they use there."""
from __future__ import annotations

import contextlib
import os

import torch

from synth4d.cine import UserError


def select_device(name: str) -> torch.device:
    """torch.device from a CLI string ("auto": CUDA (cuda:LOCAL_RANK under torchrun), then MPS, then the CPU);
    a clear UserError when the
    device is unknown or absent. On CUDA, TF32 matmuls and convolutions are allowed (Ampere and later)."""
    if name == "auto":   # under torchrun, each process takes the GPU of its LOCAL_RANK
        local = os.environ.get("LOCAL_RANK", "")
        cuda = f"cuda:{int(local) % max(torch.cuda.device_count(), 1)}" if local.isdigit() else "cuda"
        name = cuda if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} requested but MPS is not available on this machine; use --device cpu")
    return device


def autocast(device):
    """bf16 autocast on CUDA, where it speeds convolutions up; a no-op elsewhere (CPU bf16 is slower)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
