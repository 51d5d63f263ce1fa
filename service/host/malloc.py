"""glibc malloc settings for big tensors.

Every request allocates its tensors afresh (protobuf bytes, numpy arrays, onnxruntime outputs). With glibc's
defaults, buffers of a few MiB are mmapped or trimmed back to the OS when freed, and each new one then pays
a page fault per 4 KiB: about 1.75 ms per MiB on this machine, more than the copy itself. Keeping freed memory
for reuse makes a 32 MiB request's copies 3-5× faster (bench/serve_bench.py); the price is that RSS stays at
its high-water mark, which the message-size and batch limits bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and keep freed memory; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("malloc tuning skipped: %s is not glibc", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = all(
        mallopt(param, value)
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    log.info("malloc: freed memory kept for reuse (mmap threshold 32 MiB): %s", "on" if done else "refused")
    return done
