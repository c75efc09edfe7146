"""The process's heap while a registration or a training run works: freed memory kept for reuse.

An iteration of the engine, or a training step, allocates and frees the same volume-sized
temporaries again and again. By default glibc serves blocks above its mmap threshold with fresh
mappings that it unmaps on free, and trims its heap's top past a threshold, so each iteration's
temporaries are new pages that the kernel zeroes on first touch: page faults and system time in
proportion to the bytes (docs/benchmarks.md). `reused_heap` turns both off for as long as it is
open; `release_free_memory` hands free pages back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from typing import Any


@functools.cache
def _libc_function(name: str) -> Any:
    """glibc's function `name` (malloc_trim, mallopt), or None where the C library has none (musl,
    macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none."""
    return _libc_function("malloc_trim")


# mallopt's parameters (malloc.h) and glibc's defaults for the two that `reused_heap` sets
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
# free memory at the heap's top that glibc may keep inside `reused_heap`
_REUSED_TRIM_THRESHOLD = 1 << 30
# contexts open now (registrations, training runs), and the lock that guards the count
_heap_users = 0
_heap_lock = threading.Lock()


@contextlib.contextmanager
def reused_heap() -> Any:
    """Keep freed memory in the process for the next allocation while the context is open.

    An iteration allocates and frees volume-sized temporaries (box sums, warps, fields,
    activations). Inside this context every block comes from the heap and nothing is trimmed, so an
    iteration reuses the pages of the one before instead of faulting in new ones, after the first
    few iterations. Those few can leave holes a little too small for the next block (torch asks
    for a block's size plus its alignment), so the heap settles somewhat above what the default
    keeps resident: peak memory rose by up to 7 % in a registration and by 8-15 % in a 3-D training
    run (docs/benchmarks.md). The worst case is one large block allocated alone, over and over: a
    40 MiB block took 7-9 blocks' worth of heap before its rounds stopped touching new pages (the
    test of this context). When the last context open in the process exits (registrations or
    training runs in several threads share the settings), glibc's defaults for the two settings are
    restored (the mmap threshold then stays where it was, no longer adjusting itself) and the free
    pages go back to the system. Does nothing where the C library is not glibc.
    """
    global _heap_users
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        yield
        return
    # the settings are the process's: contexts in several threads (or nested) share them,
    # set by the first to enter and restored by the last to leave
    with _heap_lock:
        if _heap_users == 0:
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, _REUSED_TRIM_THRESHOLD)
        _heap_users += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                release_free_memory()


def release_free_memory() -> None:
    """Hand the heap pages that freed tensors left behind back to the system (glibc's
    malloc_trim; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
