"""Let glibc reuse freed memory for per-batch tensors instead of faulting in fresh pages.

In a fresh process glibc serves every allocation of 128 KiB or more with a new memory map
and returns heap memory to the operating system as soon as more than 128 KiB lie free at
its top. Memory obtained either way is zero pages until first written: one page fault per
4 KiB. A forward pass over a batch of images allocates and frees several tensors of a few
MiB per layer, so a process in that state spends much of a TracIn pass in the kernel (on
the benchmark CNN the channels-last forward pass ran 2.5x slower for it).

Two measures, both for glibc only:

* :func:`warm_up`, once per process. glibc adjusts both thresholds upward by itself when
  a program frees a mapped block (the map threshold to the block's size, the trim
  threshold to twice that), up to 32 MiB on 64-bit systems (``mallopt(3)``,
  "M_MMAP_THRESHOLD"); most long-running PyTorch programs get there on their own sooner
  or later. Allocating and freeing one block just under that limit gets there at once.
  Blocks of 32 MiB and more are still mapped and unmapped; smaller ones now come from
  the heap, whose freed holes stay resident for reuse, so the process (and code run in
  it later) can keep more memory than before (figures in the README).
* :func:`keep_freed_memory`, around each public call. Even at 32 MiB, the heap's top
  can hold more than the 64 MiB trim threshold once in a while (the heap grows past
  fragments while a pass runs), and every trim makes the next batches fault again. For
  the duration of a call the trim threshold is raised to 1 GiB, and on the way out it is
  put back at the 64 MiB that glibc's own adjustment gives. Memory the call freed may
  then stay in the process until the next trim. (Setting a threshold stops glibc's
  adjustment of the map threshold, which :func:`warm_up` has already taken to its
  maximum.)

Nothing is done when the process's allocator settings come from the user (the
``MALLOC_*_`` variables or ``glibc.malloc`` tunables), and nothing when the environment
variable ``PROPONENTS_KEEP_MALLOC`` is set to anything but ``""`` or ``"0"``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Environment variable that turns the warm-up off (any value but "", "0").
OPT_OUT_VARIABLE = "PROPONENTS_KEEP_MALLOC"

#: glibc's largest dynamically chosen map threshold: 4 MiB per byte of ``long``
#: (32 MiB on 64-bit systems). The block stays 64 KiB under it, so that with glibc's
#: chunk header and page rounding its size still counts for the adjustment.
_BLOCK_BYTES = 4 * 2**20 * ctypes.sizeof(ctypes.c_long) - 2**16

#: glibc's ``mallopt`` parameter number for the trim threshold (malloc.h: M_TRIM_THRESHOLD).
_M_TRIM_THRESHOLD = -1
#: Trim threshold inside a call, and the one glibc's adjustment reaches (restored after).
_CALL_TRIM_BYTES = 2**30
_DYNAMIC_TRIM_BYTES = 2 * _BLOCK_BYTES

#: Variables through which a user sets glibc's allocator up; any of them means hands off.
_USER_SETTINGS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
)

_lock = threading.Lock()
_state: dict[str, bool] = {}
_calls_inside = [0]


def _opted_out() -> bool:
    if os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
        return True
    if any(name in os.environ for name in _USER_SETTINGS):
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library of this process, when it is glibc (the only one this applies to)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return None
    version.restype = ctypes.c_char_p
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def warm_up() -> bool:
    """Free one block just under glibc's 32 MiB limit, once per process (see the module).

    Returns:
        Whether a block was allocated and freed by this call: ``False`` after the first
        time, when ``PROPONENTS_KEEP_MALLOC`` is set, or when the process does not run
        on glibc.
    """
    with _lock:
        if "done" in _state or _opted_out():
            return False
        libc = _libc()
        block = libc.malloc(_BLOCK_BYTES) if libc is not None else None
        _state["done"] = bool(block)
        if not block:  # not glibc, or out of memory: nothing to undo
            return False
        libc.free(block)  # type: ignore[union-attr]
        return True


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Inside, glibc keeps freed heap memory for reuse (see the module); calls may nest."""
    warm_up()
    libc = _libc() if _state.get("done") else None
    if libc is None:
        yield
        return
    with _lock:
        _calls_inside[0] += 1
        if _calls_inside[0] == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, _CALL_TRIM_BYTES)
    try:
        yield
    finally:
        with _lock:
            _calls_inside[0] -= 1
            if _calls_inside[0] == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _DYNAMIC_TRIM_BYTES)


__all__ = ["OPT_OUT_VARIABLE", "keep_freed_memory", "warm_up"]
