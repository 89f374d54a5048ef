"""Process settings the CPU path needs to run at speed: heap reuse, and how numba kernels launch.

glibc serves allocations of 128 KiB and up with fresh ``mmap`` pages and hands freed ones back
to the OS, so every layer of a step would page-fault in again the buffers the previous layer
freed (activations, context gathers, GEMM outputs). Keeping freed memory in the heap makes the
next allocation of the same size free; it is what tcmalloc/jemalloc (``LD_PRELOAD``) give
PyTorch CPU deployments, without them. Measured on SmolLM2-135M (2-core AMD EPYC, fp32, CPU
time of one thread, so the shared machine's load weighs less): a 512-token prefill takes
1.30-1.32 s with it against 1.42-1.44 s without (8% less); decode steps showed no difference
beyond the noise (one decode 46-52 ms either way, 16 decodes 81-91 ms against 87-88 ms).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

import numba
import torch

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


_LAUNCH_LOCK = threading.Lock()
_numba_threads = threading.local()  # numba's thread count is a per-calling-thread setting


def run_parallel(kernel: Callable[..., None], *args: object) -> None:
    """``kernel(*args)`` for a ``parallel=True`` numba kernel (``gemv``, CPU decode attention).

    - The kernel gets as many threads as torch uses, so ``torch.set_num_threads`` governs every
      CPU op. numba keeps that setting per calling thread, so it is checked at each launch (the
      engine may run on a thread of its own, ``AsyncEngine``) and changed only when it differs:
      ``numba.set_num_threads`` costs about a microsecond, a tenth of a small projection.
    - Launches from different threads take turns: numba's fallback threading layer (workqueue,
      used where no OpenMP runtime is installed) aborts the process on concurrent launches.
    """
    with _LAUNCH_LOCK:
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if getattr(_numba_threads, "count", None) != threads:
            numba.set_num_threads(threads)
            _numba_threads.count = threads
        kernel(*args)
