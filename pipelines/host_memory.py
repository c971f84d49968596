"""Host memory allocator tuning for CPU-side batch work.

Batched augmentation allocates large per-step temporaries (at 224 px, tens of MB per call). With
glibc's defaults every block above the mmap threshold (128 KiB to 32 MiB, adaptive) is mapped
fresh from the kernel and unmapped when freed, and freed heap memory is trimmed back to the OS:
each step then page-faults all of its temporaries in again. Keeping freed memory in the process
turns those page faults into plain reuse. Measured on the 2-core dev machine
(docs/benchmarks.md): the 224 px views of one step take 204 ms with the defaults and 106 ms
with :func:`keep_freed_memory` (1 thread). PyTorch's CPU performance guide recommends a caching
allocator (jemalloc, TCMalloc) for the same reason; this gets most of it without a preload.

The cost is a resident set that stays at its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Serve blocks up to 1 GiB from the heap instead of fresh mappings (glibc versions that cap the
# threshold refuse it: then the documented 64-bit cap, 32 MiB), and never trim freed heap memory
# back to the OS.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_NO_TRIM = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (idempotent; per process).

    Call it once, early, in the process that does the batched host work; forked DataLoader
    workers inherit the setting. Set ``BMB_KEEP_FREED_MEMORY=0`` to leave malloc untouched.

    Returns:
        True when the setting is in effect, False where it does not apply (not glibc, or
        disabled by the environment variable).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("BMB_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no glibc mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = any(mallopt(_M_MMAP_THRESHOLD, t) for t in _MMAP_THRESHOLDS)
    _applied = mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))
    return _applied
