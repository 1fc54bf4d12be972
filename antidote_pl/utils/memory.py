"""Handing the memory a finished step freed back to the operating system (glibc's ``malloc_trim``).

glibc's allocator keeps freed heap memory for later allocations instead of returning it, so one
step's peak stays in a process's resident size for the rest of a many-step run. In the SmolLM2
pipeline the peak is refusal re-alignment with k = 64 (64 sequences in one training batch): after
it, a shrunk one-seed run (``benchmarks/bench_memory.py``) stayed resident at 7-10 GB through every
later evaluation and the re-attack, which need 2-6 GB; the full 3-seed fp32 run sat at about 17 GB
through its evaluations and was killed by the out-of-memory killer on a 24 GiB machine.
``malloc_trim(0)`` after each step gives the free pages back. It moves no tensor and changes no
result; where the C library has no ``malloc_trim`` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the process's C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the operating system; ``True`` if any were released.

    Cheap next to a pipeline step (it walks the allocator's free lists). Called by
    :meth:`antidote_pl.experiment.cache.StepTimes.timed` when a step ends.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux ``/proc``), ``None`` elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
