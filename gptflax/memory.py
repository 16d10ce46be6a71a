"""glibc's malloc, told to keep the memory it frees (one arena, no mmap, no trimming), and to
back its heap with 2 MB pages.

XLA's CPU runtime allocates a train step's scratch memory afresh at every step; by default glibc
hands those blocks back to the kernel, and touching them again the next step costs about a
million page faults (2 s of kernel time per 124M step at batch 8). The Makefile sets the same
through MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_; the command line calls
`keep_freed_memory()` first, so that `python -m gptflax` needs no environment of its own.

A batch-1 decoding step streams every weight and, layer by layer, the KV cache: on 4 KB pages it
misses the TLB at every page, which costs most inside a VM. Where the kernel gives transparent
huge pages only to memory that asks for them (numpy asks for its large arrays), glibc asks for its
heap under the tunable `glibc.malloc.hugetlb=1`, read only when a process starts: the Makefile
exports it, and `python -m gptflax` runs itself again with it (`with_huge_pages`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"  # 1: madvise the heap for huge pages; 0: don't

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


def huge_pages_env(env: dict) -> dict | None:
    """`env` with glibc's heap on huge pages added to its GLIBC_TUNABLES; None where the C library
    is not glibc or `env` already sets the tunable (to 0, say, to keep 4 KB pages)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or HUGE_PAGES in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES}=1"]))}


def with_huge_pages() -> None:
    """Replace this process with the same command run with `huge_pages_env`, unless it already
    has it: call it first thing in a program's entry point."""
    env = huge_pages_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
