"""glibc's malloc, told to keep the memory it frees (one arena, no mmap, no trimming).

XLA's CPU runtime allocates a train step's scratch memory afresh at every step; by default glibc
hands those blocks back to the kernel, and touching them again the next step costs about a
million page faults (2 s of kernel time per 124M step at batch 8). The Makefile sets the same
through MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_; the command line calls
`keep_freed_memory()` first, so that `python -m gptflax` needs no environment of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Set glibc's malloc as the module's docstring says; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    settings = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
    return all(mallopt(param, value) == 1 for param, value in settings.items())
