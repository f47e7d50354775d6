"""Let glibc reuse freed memory for per-batch tensors instead of faulting in fresh pages.

In a fresh process glibc serves every allocation of 128 KiB or more with a new memory map
and returns heap memory to the operating system as soon as more than 128 KiB lie free at
its top. Memory obtained either way is zero pages until first written: one page fault per
4 KiB. A forward pass over a batch of images allocates and frees several tensors of a few
MiB per layer, so a process in that state spends much of a TracIn pass in the kernel (on
the benchmark CNN the channels-last forward pass ran 2.5x slower for it).

glibc adjusts both thresholds upward by itself when a program frees a mapped block (the
map threshold to the block's size, the trim threshold to twice that), up to 32 MiB on
64-bit systems (``mallopt(3)``, "M_MMAP_THRESHOLD"); most long-running PyTorch programs
get there on their own sooner or later. :func:`warm_up` gets there at once by allocating
and freeing one block just under that limit, the first time a public call runs. Nothing
else changes: blocks of 32 MiB and more are still mapped and unmapped, at most 64 MiB of
freed heap is kept for reuse, thresholds set explicitly (``mallopt`` or the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables) are left as they are
(glibc stops adjusting them), and other allocators just see one free block.

Set the environment variable ``PROPONENTS_KEEP_MALLOC=1`` to skip it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

#: Environment variable that turns the warm-up off (any value but "", "0").
OPT_OUT_VARIABLE = "PROPONENTS_KEEP_MALLOC"

#: glibc's largest dynamically chosen map threshold: 4 MiB per byte of ``long``
#: (32 MiB on 64-bit systems). The block stays 64 KiB under it, so that with glibc's
#: chunk header and page rounding its size still counts for the adjustment.
_BLOCK_BYTES = 4 * 2**20 * ctypes.sizeof(ctypes.c_long) - 2**16

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0")


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
    return libc


def warm_up() -> bool:
    """Free one block just under glibc's 32 MiB limit, once per process (see the module).

    Returns:
        Whether a block was allocated and freed by this call: ``False`` after the first
        time, when ``PROPONENTS_KEEP_MALLOC`` is set, or when the process does not run
        on glibc.
    """
    with _lock:
        if _state.get("done") or _opted_out():
            return False
        _state["done"] = True
        libc = _libc()
        if libc is None:
            return False
        block = libc.malloc(_BLOCK_BYTES)
        if not block:  # out of memory: nothing to undo
            return False
        libc.free(block)
        return True


__all__ = ["OPT_OUT_VARIABLE", "warm_up"]
