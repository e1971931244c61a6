"""Which device the networks run on, and the mixed precision they use there."""
from __future__ import annotations

import contextlib
import functools
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


PRECISIONS = ("auto", "fp32", "bf16")
_precision = "auto"   # process-wide, like torch's own TF32 switches: set once by the CLI's --precision


def set_precision(precision: str) -> None:
    """How the networks compute: "bf16" (bf16 autocast: convolutions and matmuls in bfloat16, weights,
    losses and reductions in float32), "fp32", or "auto": bf16 on CUDA and on CPUs with native bf16
    arithmetic (avx512_bf16 or AMX), fp32 elsewhere."""
    global _precision
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    _precision = precision


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 flags avx512_bf16 or amx_bf16, read from /proc/cpuinfo).

    Without them oneDNN emulates bf16 and is slower than fp32; with them a motion-denoiser forward took
    0.57x and a decoder forward 0.37x the fp32 time on a 2-core AMD EPYC (one thread; weights/EXPERIMENTS.md).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:   # not Linux: stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device) -> bool:
    """Whether `autocast(device)` computes in bf16 under the process's precision."""
    kind = torch.device(device).type
    if _precision == "fp32" or kind not in ("cuda", "cpu"):
        return False
    return _precision == "bf16" or kind == "cuda" or native_bf16_cpu()


def autocast(device):
    """bf16 autocast where uses_bf16(device), else a no-op."""
    if uses_bf16(device):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
