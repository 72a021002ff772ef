"""Buffers for registration: page-aligned anonymous memory, huge pages where
they pay.

A NIC pins every page of a registered region, and the shm provider pins the
source pages of every write it copies (``process_vm_readv``): with 2 MiB
pages that is 512 times fewer pages to look up and pin than with 4 KiB
ones.  Linux backs memory with transparent huge pages only where a region
asks for them (``madvise``, Debian's default) and only for 2 MiB extents
that lie wholly inside it; numpy asks from 4 MiB up but does not align, so a
4 MiB numpy array gets one huge page of two.  :func:`alloc` aligns.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import _core

#: size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB pages)
HUGE_PAGE = 2 << 20


def alloc(nbytes: int, *, huge_pages: bool = True) -> np.ndarray:
    """A zeroed, writable, C-contiguous ``uint8`` array of ``nbytes`` bytes in
    its own anonymous mapping, ready for :meth:`TransferEngine.register`.

    From 2 MiB up (with ``huge_pages``) it starts on a 2 MiB boundary and is
    advised for transparent huge pages; otherwise it is page-aligned.  The
    mapping lives as long as the array or any view of it does.
    """
    n = _core.arg_uint("nbytes", nbytes)   # the package's one argument check
    huge = huge_pages and n >= HUGE_PAGE
    align = HUGE_PAGE if huge else mmap.PAGESIZE
    span = max(n, 1) + (align - mmap.PAGESIZE if huge else 0)
    mm = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mm, dtype=np.uint8)
    start = -whole.ctypes.data % align
    if huge and hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, n)
        except OSError:   # THP compiled out or disabled: 4 KiB pages, still correct
            pass
    return whole[start:start + n]
