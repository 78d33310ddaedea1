"""Keep freed tensor memory for reuse instead of returning it to the system.

On Linux with glibc, ``malloc`` serves every request above its ``mmap`` threshold (at
most 32 MB by default) with fresh pages from the kernel and gives them back on
``free``. A residual block's hidden activations are larger than that (``64 x 512 x 28
x 28`` floats: 103 MB), so every pass of every step faulted its result tensors in page
by page; measured on the paper's one-block-per-scale MNIST model, that was about a
third of a CPU training step (``docs/RESULTS.md``). :func:`keep_freed_memory` raises
the threshold and the trim threshold so such blocks come from ``malloc``'s heap and are
reused from step to step. Peak memory stays that of the largest step; the resident
size no longer shrinks between steps.

The command line and :class:`~resflow.training.Trainer` call it; set
``RESFLOW_KEEP_MEMORY=0`` to leave ``malloc`` as it is. Elsewhere (macOS, Windows,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LIMIT = 2**31 - 1  # the largest value mallopt takes (an int)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's ``mmap`` and trim thresholds (once per process); returns whether
    they are raised. Allocations above the new threshold (2 GiB) still use ``mmap``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RESFLOW_KEEP_MEMORY", "1") in ("0", "false", "False", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_TRIM_THRESHOLD, LIMIT)) and bool(mallopt(M_MMAP_THRESHOLD, LIMIT))
    return _applied
