"""aiotransfer.alloc: registration buffers (alignment, huge-page advice,
lifetime, bad input) and real writes between two of them."""
from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import pytest

import aiotransfer
from aiotransfer.memory import HUGE_PAGE

from support import assert_bytes

MiB = 1 << 20


def _vma_flags(addr: int) -> list[str]:
    """VmFlags of the mapping that holds addr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.parametrize("n", [0, 1, 100, 4096, 65537, HUGE_PAGE - 1, HUGE_PAGE, 3 * MiB + 5])
def test_alloc_shape_zeroed_writable_aligned(n):
    buf = aiotransfer.alloc(n)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8
    assert buf.nbytes == n and buf.flags.c_contiguous and buf.flags.writeable
    assert not buf.any()
    align = HUGE_PAGE if n >= HUGE_PAGE else mmap.PAGESIZE
    if n:
        assert buf.ctypes.data % align == 0
        buf[:] = 0xA5
        buf[-1] = 7
        assert buf[-1] == 7 and (n == 1 or buf[0] == 0xA5)


def test_alloc_without_huge_pages_is_page_aligned():
    buf = aiotransfer.alloc(4 * MiB, huge_pages=False)
    assert buf.ctypes.data % mmap.PAGESIZE == 0 and buf.nbytes == 4 * MiB
    assert "hg" not in _vma_flags(buf.ctypes.data)


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="this kernel has no transparent huge pages")
def test_alloc_advises_huge_pages_from_2_mib():
    big = aiotransfer.alloc(4 * MiB)
    assert "hg" in _vma_flags(big.ctypes.data), "MADV_HUGEPAGE not applied"
    small = aiotransfer.alloc(64 * 1024)
    assert "hg" not in _vma_flags(small.ctypes.data)


def test_alloc_memory_lives_as_long_as_a_view():
    view = aiotransfer.alloc(3 * MiB)[MiB:MiB + 16]
    gc.collect()
    view[:] = np.arange(16, dtype=np.uint8)
    assert view.tolist() == list(range(16))


@pytest.mark.parametrize("bad,exc,text", [
    (-1, ValueError, r"nbytes=-1 is out of range \[0, 18446744073709551616\)"),
    (1.5, TypeError, "nbytes must be an integer, not float"),
    ("8", TypeError, "nbytes must be an integer, not str"),
    (True, TypeError, "nbytes must be an integer, not bool"),
])
def test_alloc_bad_input(bad, exc, text):
    with pytest.raises(exc, match=text):
        aiotransfer.alloc(bad)


async def test_writes_between_alloc_buffers(pair, rng, seed):
    """Random sizes and offsets from one alloc'd region into another, every
    byte checked, including across the 2 MiB huge-page boundaries."""
    a, b = pair
    n = 6 * MiB
    src, dst = aiotransfer.alloc(n), aiotransfer.alloc(n)
    src[:] = rng.integers(0, 256, n, dtype=np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    expected = dst.copy()
    for i in range(12):
        size = int(rng.integers(1, 3 * MiB))
        so, do = int(rng.integers(0, n - size)), int(rng.integers(0, n - size))
        await a.write(smr, dmr.descriptor, length=size, src_offset=so, dst_offset=do, imm=9)
        await b.expect_imm(9, 1, timeout=30)
        expected[do:do + size] = src[so:so + size]
        assert_bytes(dst, expected, f"seed={seed} write #{i}: {size} B {so}->{do}")
    a.deregister(smr)
    b.deregister(dmr)
