"""The C allocator under CPU tensors: freed blocks kept for reuse instead of returned to the OS.

glibc's ``malloc`` serves every block above its mmap threshold (32 MB at most) with a fresh
``mmap`` and unmaps it on ``free``, and trims the top of its heap back to the OS; the next tensor
of that size then faults in every page again, and the kernel zeroes each one. Training on and
prefilling long sequences allocate and free many such tensors per step (a (T, 8, 128) float32
activation is 16 MB at T = 4096, 64 MB at T = 16384), so the page faults cost a good part of the
elementwise work: on the 2-core CPU this project is measured on, a Gated DeltaNet layer's
forward+backward at T = 16384 took 15% less time with them gone (``rnnlab bench speed layers``;
the README's speed section has the numbers).

:func:`reuse_freed_memory` makes ``malloc`` serve all blocks from its heap and keep what is freed
for later blocks, as allocators such as jemalloc and tcmalloc do. The cost: the process's resident
memory stays at its peak instead of shrinking after it. The ``rnnlab`` commands that train, evaluate
and benchmark call it; library users call it themselves if they want it. It applies to glibc
(Linux) only; elsewhere it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_applied = False


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it. Returns True
    when applied (now or by an earlier call), False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt tunables worth setting
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success: no block from mmap, and a trim threshold of 2 GiB - 1 (the largest int)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied
