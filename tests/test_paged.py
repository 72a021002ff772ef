"""engine.write_paged: page lists (numpy and Python), strides, offsets, one immediate per page."""
from __future__ import annotations

import numpy as np
import pytest

from support import KiB, MAX_TRANSFER, MiB, assert_bytes, random_bytes, settle

PAGE_DTYPES = ["list", "int64", "int32", "uint16", "uint64", "intp"]


def _pages(rng, n: int, limit: int, kind: str, unique: bool):
    p = rng.permutation(limit)[:n] if unique else rng.integers(0, limit, n)
    if kind == "list":
        return [int(x) for x in p]
    return p.astype(kind)


def expected_paged(dst, src, sp, dp, *, page_size, ss, ds, so, do):
    out = dst.copy()
    for s, d in zip(np.asarray(sp, dtype=np.int64), np.asarray(dp, dtype=np.int64)):
        out[do + d * ds:do + d * ds + page_size] = src[so + s * ss:so + s * ss + page_size]
    return out


async def _paged_round(a, b, rng, seed, provider, *, page_size, npages, kind, src_stride,
                       dst_stride, src_offset, dst_offset, imm):
    ss = page_size if src_stride is None else src_stride
    ds = page_size if dst_stride is None else dst_stride
    src_limit = max(1, npages + int(rng.integers(0, 8)))
    dst_limit = npages + int(rng.integers(0, 8))
    src = random_bytes(rng, src_offset + (src_limit - 1) * ss + page_size)
    dst = random_bytes(rng, dst_offset + max(dst_limit - 1, 0) * ds + page_size)
    sp = _pages(rng, npages, src_limit, kind, unique=False)  # a source page may repeat
    dp = _pages(rng, npages, dst_limit, kind, unique=True)   # destination pages are distinct
    smr, dmr = a.register(src), b.register(dst)
    expected = expected_paged(dst, src, sp, dp, page_size=page_size, ss=ss, ds=ds,
                              so=src_offset, do=dst_offset)
    ctx = (f"seed={seed} {provider} page_size={page_size} npages={npages} {kind} "
           f"src_stride={src_stride} dst_stride={dst_stride} src_offset={src_offset} "
           f"dst_offset={dst_offset} imm={imm}")
    fut = a.write_paged(smr, sp, dmr.descriptor, dp, page_size=page_size, src_stride=src_stride,
                        dst_stride=dst_stride, src_offset=src_offset, dst_offset=dst_offset,
                        imm=imm)
    if imm is not None and npages:
        await b.expect_imm(imm, npages, timeout=60)
        # every page's immediate is in: every page must be in place already
        assert_bytes(dst, expected, ctx + " (checked when the last immediate arrived)")
    assert await fut is None
    assert_bytes(dst, expected, ctx)
    a.deregister(smr)
    b.deregister(dmr)


@pytest.mark.parametrize("kind", PAGE_DTYPES)
async def test_paged_random(pair, provider, rng, seed, kind):
    a, b = pair
    for round_ in range(6):
        page_size = int(rng.choice([1, 7, 512, 4096, 4099, 16 * KiB]))
        npages = int(rng.integers(1, 80))
        src_stride = None if rng.random() < 0.4 else int(
            rng.integers(max(1, page_size // 2), 2 * page_size + 5))  # may overlap on the source
        dst_stride = None if rng.random() < 0.4 else int(rng.integers(page_size, 2 * page_size + 5))
        await _paged_round(a, b, rng, seed, provider, page_size=page_size, npages=npages,
                           kind=kind, src_stride=src_stride, dst_stride=dst_stride,
                           src_offset=int(rng.integers(0, 5000)),
                           dst_offset=int(rng.integers(0, 5000)),
                           imm=int(rng.integers(0, 2 ** 32)) if round_ % 3 else None)
    await settle()


async def test_paged_big(pair, provider, rng, seed):
    """Many large pages (up to the provider's transfer cap in total)."""
    a, b = pair
    page_size = 64 * KiB
    npages = min(MAX_TRANSFER[provider], 16 * MiB) // page_size
    await _paged_round(a, b, rng, seed, provider, page_size=page_size, npages=npages,
                       kind="int64", src_stride=None, dst_stride=page_size + 4096,
                       src_offset=12345, dst_offset=999, imm=123456)
    await settle()
    assert b.imm_counter(123456).total == npages


async def test_paged_one_immediate_per_page_exactly(pair, rng):
    a, b = pair
    src = random_bytes(rng, 64 * 100)
    dst = np.zeros(64 * 100, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    pages = list(range(0, 100, 3))
    await a.write_paged(smr, pages, dmr.descriptor, pages, page_size=64, imm=77)
    await b.expect_imm(77, len(pages), timeout=30)
    await settle()
    c = b.imm_counter(77)
    assert (c.value, c.total) == (0, len(pages))
    for p in range(100):
        got = dst[p * 64:(p + 1) * 64]
        want = src[p * 64:(p + 1) * 64] if p in pages else np.zeros(64, np.uint8)
        assert_bytes(got, want, f"page {p}")


@pytest.mark.parametrize("pages", [[], np.array([], dtype=np.int64), np.array([], dtype=float)])
async def test_paged_empty_page_list(pair, rng, pages):
    a, b = pair
    src, dst = random_bytes(rng, 4096), random_bytes(rng, 4096)
    before = dst.copy()
    smr, dmr = a.register(src), b.register(dst)
    assert await a.write_paged(smr, pages, dmr.descriptor, pages, page_size=4096, imm=5) is None
    await a.write_imm(dmr.descriptor, 6)
    await b.expect_imm(6, 1, timeout=30)
    await settle()
    assert b.imm_counter(5).total == 0
    assert_bytes(dst, before, "an empty page list writes nothing")


async def test_paged_last_page_ends_exactly_at_region_end(pair, rng):
    a, b = pair
    # src: page 9 at 3 + 9*100 ends at byte 1003; dst: page 6 at 5 + 6*120 ends at 825
    src, dst = random_bytes(rng, 1003), random_bytes(rng, 825)
    smr, dmr = a.register(src), b.register(dst)
    expected = expected_paged(dst, src, [9, 0], [6, 0], page_size=100, ss=100, ds=120, so=3,
                              do=5)
    await a.write_paged(smr, [9, 0], dmr.descriptor, [6, 0], page_size=100, dst_stride=120,
                        src_offset=3, dst_offset=5)
    assert_bytes(dst, expected, "edge pages")
