"""Keep freed CPU tensor memory in the process for reuse instead of returning it to the kernel.

glibc serves allocations above its mmap threshold (at most 32 MiB, often far less) with
fresh mmap()ed pages and unmaps them on free, so every large activation of every
network call page-faults its memory in again. At batch 16 on the 121 M UNet that is
most of the cost of the memory-bound passes: quantising a 16×128×64×64 map took 11.1 ms
with glibc's defaults and 1.8 ms with freed memory kept (benchmarks/RESULTS.md). The
price is that the process keeps its peak footprint resident, which is what a sampling
worker or a training process does anyway. Other allocators (jemalloc, tcmalloc) cache
by themselves; this is the no-dependency fix for the default one. Set
SYNTHMRI_RETAIN_FREED_MEMORY=0 to leave malloc alone (with another allocator preloaded, or
to measure glibc's defaults).
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30  # allocations up to 1 GiB come from the reusable heap


@functools.cache
def retain_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse (once per process); False where not glibc."""
    if os.environ.get("SYNTHMRI_RETAIN_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
