"""How the process allocates tensor memory on the CPU. Imports no torch, so the CLI can call it first."""
from __future__ import annotations

import functools

MMAP_THRESHOLD = 1 << 30   # bytes: glibc serves blocks below this from its heap, not from fresh mmap pages
TRIM_THRESHOLD = 1 << 31   # bytes: free memory kept at the top of the heap before it is returned to the system


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed tensor memory instead of mapping fresh zeroed pages for every large tensor.

    By default glibc maps every block above 32 MB (and, until its adaptive threshold has grown, many
    smaller ones) with mmap and unmaps it on free, so each such tensor costs a page fault per 4 KB on
    first touch: in the VAE decoder's full-resolution layers (8 frames x 12 channels x 96 x 96 x 12 in
    fp32 = 42 MB per activation) the kernel's page faulting (system time) took more than the convolutions.
    Raising the mmap and trim thresholds (mallopt, as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    environment variables would at start-up) cut the fp32 decoding time by 30-50 % on a 2-core AMD EPYC
    (weights/EXPERIMENTS.md). Freed memory then stays with the process up to 2 GB, so its resident size
    is its peak. A no-op returning False off glibc (macOS, Windows, musl) or where mallopt refuses.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        # -3: M_MMAP_THRESHOLD, -1: M_TRIM_THRESHOLD (malloc.h)
        return bool(libc.mallopt(-3, MMAP_THRESHOLD)) and bool(libc.mallopt(-1, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
