"""Process settings the CPU (torch reference) path needs to run at speed.

glibc serves allocations of 128 KiB and up with fresh ``mmap`` pages and hands freed ones back
to the OS. A decode step allocates and frees the same few buffers (context gathers, GEMM
outputs) in every layer, so each step page-faults them in again: measured on SmolLM2-135M, 16
concurrent decodes ran 2x slower (127 vs 66 ms per step) and a 512-token prefill 15% slower.
Keeping freed memory in the heap makes the next layer's allocation of the same size free.
This is what tcmalloc/jemalloc (``LD_PRELOAD``) give PyTorch CPU deployments, without them.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks (up to 32 MiB each) for reuse; idempotent, process-wide.

    Returns whether the settings took effect (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
