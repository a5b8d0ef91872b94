"""Host memory for serving: arrays that XLA:CPU adopts without a copy, and handing freed heap back.

Serving a 2B4T-shaped model fits in about 1.1 GB only if nothing is held twice: weights are read
into 64-byte-aligned numpy arrays, which `jax.device_put` on CPU adopts instead of copying, the
heap pages that compiling or loading freed are returned to the OS (glibc keeps up to tens of
MB per arena otherwise, and some 100 MB after an XLA compile), and a server's large blocks (XLA's
temporary buffers) are mapped apart and unmapped when freed (`map_large_blocks`).
"""

from __future__ import annotations

import ctypes

import numpy as np

ALIGNMENT = 64  # what XLA:CPU requires of host memory it adopts

# `map_large_blocks`' threshold: above a one-row decode step's temporary buffer (2B4T: 1.5 MB),
# so that single-stream serving reuses its buffer from the heap; below a batched step's (12.3 MB
# at 8 rows) and a prefill chunk's.
LARGE_BLOCK = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def release_freed_memory() -> None:
    """Returns the free pages of every malloc arena to the OS (glibc's `malloc_trim`; elsewhere
    a no-op)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Makes glibc's malloc serve every block of `threshold` bytes or more from a mapping of its
    own, unmapped when it is freed; True where that took (glibc), False elsewhere (a no-op).

    For the whole process, from now on. glibc's default threshold moves: it starts at 128 KiB and,
    each time a mapped block is freed, rises to that block's size (up to 32 MiB), after which
    such blocks come from the arenas, which keep their pages when the blocks are freed. In a
    server the large blocks are XLA's temporary buffers, a batched decode step's and each prefill
    chunk's, whose freed pages the arenas then held at the peak: the 2B4T server at 8 clients,
    top_p 0.9, peaked at 1212-1221 MB with the moving threshold and 1190-1195 with it fixed at
    4 MiB (1 MiB and 256 KiB: 1188-1192), its step times unchanged: mapping a 12.3 MB buffer
    anew is ~3,000 page faults against a 65 ms step (benchmarks/RESULTS.md, "Large blocks
    mapped apart").
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
