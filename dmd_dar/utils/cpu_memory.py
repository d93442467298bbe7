"""Keep freed CPU memory in the process for training on the CPU (glibc only).

With glibc's default policy every training pass hands the top of its heap back to the operating system when its
activations are freed, and the next pass page-faults the same memory back in (the kernel zero-fills every page).
In the embedded DMD2 trainer that cost 7-9% of each iteration (``eval/bench_distill.py``, one thread), most of it
inside the teacher's forward, which runs while the student's graph holds the heap below it. Two ``mallopt`` settings stop the round trip:

- ``M_MMAP_THRESHOLD`` at glibc's maximum (32 MiB on 64-bit): tensors below it come from the heap. Setting any
  option turns glibc's self-tuning of this threshold off, so it has to be set explicitly along with the next one.
- ``M_TRIM_THRESHOLD`` far above any run's peak: freed heap tops stay in the process for the next pass.

The process's resident memory then stays at its peak instead of shrinking between passes. A user who sets any
``MALLOC_*`` environment variable (glibc's own tunables) keeps their settings: this module then does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["retain_freed_memory"]

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _glibc():
    """The C library when it is glibc (which has ``mallopt``), else None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(libc=None, environ=None) -> bool:
    """Apply the policy above (idempotent); True when it is in force after the call.

    ``libc`` and ``environ`` default to the process's C library and environment (tests pass stand-ins).
    """
    environ = os.environ if environ is None else environ
    if any(key.startswith("MALLOC_") for key in environ):
        return False
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    # mallopt returns 1 on success and 0 on error; the trim threshold only matters with the mmap one in place
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
