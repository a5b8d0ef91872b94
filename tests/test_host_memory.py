"""serve/host_memory.py: aligned host arrays, and glibc's malloc handing large freed blocks back."""

import platform
import subprocess
import sys

import numpy as np
import pytest

from bitnet_jax.serve.host_memory import ALIGNMENT, aligned_empty


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.int8), ((7,), np.float32), ((2, 3, 4), np.uint32)])
def test_aligned_empty_is_aligned_and_shaped(shape, dtype):
    x = aligned_empty(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.flags.c_contiguous
    assert x.ctypes.data % ALIGNMENT == 0


# In a fresh interpreter (the setting is the whole process's): malloc a block of 8 MiB, write it,
# free it, three times, and print how much of it the process still holds after each free.
_RETAINED = """
import ctypes, os, sys

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

if sys.argv[1] == "map":  # (the default's interpreter imports nothing that could move the threshold first)
    from bitnet_jax.serve.host_memory import map_large_blocks

    assert map_large_blocks() is True
size = 8 << 20
retained = []
for _ in range(3):
    before = resident()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    retained.append(resident() - before)
print(max(retained))
"""


def _retained_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_map_large_blocks_hands_freed_blocks_back():
    # glibc's default: the first 8 MiB block is mapped, and freeing it raises the threshold to its
    # size, so the next one comes from the heap, whose top is trimmed only beyond twice that: the
    # process keeps that block's pages after the free (all 8 MiB of them; 6 MiB leaves room for
    # the interpreter's own heap moving meanwhile). With `map_large_blocks` every such block is
    # mapped and unmapped: what stays is at most the interpreter's few pages (1 MiB of room).
    assert _retained_bytes("default") >= 6 << 20
    assert _retained_bytes("map") <= 1 << 20
