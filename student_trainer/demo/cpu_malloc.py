"""glibc malloc settings that halve the time of a small model's training step on CPU.

PyTorch's CPU allocator is plain ``malloc``. A tiny LM's step is dominated by tensors of tokens × vocabulary
(8 × 128 tokens × 50,257 ids in fp32 = 206 MB of logits, and as much again for their gradient), far above
glibc's mmap threshold (at most 32 MB): each is mapped fresh, freed with ``munmap``, and every step faults
all its pages in again. The demo's one-seed run spent 38% of its CPU time in the kernel (69 M minor page
faults). Served from the heap (``M_MMAP_MAX`` = 0) and never trimmed back (a high ``M_TRIM_THRESHOLD``), the
same pages are reused: ``bench/cpu_malloc.py`` measures the step time with and without.

The cost: a process keeps its peak heap until it exits instead of returning freed memory to the system.
Values a user set in the environment are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before glibc gives memory back
ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the settings added for a child process (glibc reads them at start-up)."""
    return {**ENV, **env}


def apply_here() -> bool:
    """The same settings for this running process (``mallopt``); False where libc is not glibc. Settings the
    environment already gives this process (read by glibc at start-up) are left alone."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if "MALLOC_MMAP_MAX_" not in os.environ:
        mallopt(_M_MMAP_MAX, 0)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return True
