"""engine.write / engine.write_imm between two engines of one process."""
from __future__ import annotations

import asyncio
import mmap

import numpy as np
import pytest

from aiotransfer import RemoteRegion

import peers

from support import (KiB, MAX_TRANSFER, MiB, assert_bytes, random_bytes, random_sizes,
                     settle)

IMM_MAX = 2 ** 32 - 1


async def test_write_random_sizes_and_offsets(pair, provider, rng, seed):
    """Random sizes 0 B .. cap (one big one), random offsets and immediates.
    The receiver waits for the immediate *before* the writer's future is
    awaited and checks every byte right away: the immediate must never
    arrive before the data it announces."""
    a, b = pair
    cap = MAX_TRANSFER[provider]
    slack = 64 * KiB
    src = random_bytes(rng, cap + slack)
    dst = random_bytes(rng, cap + slack)
    smr, dmr = a.register(src), b.register(dst)
    sizes = random_sizes(rng, provider, 14, big=1)
    rng.shuffle(sizes)
    for i, n in enumerate(sizes):
        so = int(rng.integers(0, slack))
        do = int(rng.integers(0, slack))
        imm = int(rng.integers(0, 2 ** 32))
        expected = dst.copy()
        expected[do:do + n] = src[so:so + n]
        ctx = f"seed={seed} write #{i}: {n} B src_offset={so} dst_offset={do} imm={imm}"
        fut = a.write(smr, dmr.descriptor, length=n, src_offset=so, dst_offset=do, imm=imm)
        await b.expect_imm(imm, 1, timeout=60)
        assert_bytes(dst, expected, ctx + " (checked when the immediate arrived)")
        assert await fut is None
        assert b.imm_counter(imm).value == 0, ctx
    await settle()
    stats = b.stats()[0]
    assert stats["imms_received"] == len(sizes), f"seed={seed}: {stats}"


async def test_concurrent_random_writes_to_disjoint_ranges(pair, provider, rng, seed):
    """Many writes of random sizes in flight at once, each to its own range."""
    a, b = pair
    count = 64
    sizes = [int(rng.integers(0, 64 * KiB)) for _ in range(count)]
    sizes[rng.integers(0, count)] = 0
    total = sum(sizes)
    src = random_bytes(rng, total + count * 7)
    dst = random_bytes(rng, total + count * 11)
    smr, dmr = a.register(src), b.register(dst)
    expected = dst.copy()
    futs = []
    so = do = 0
    for i, n in enumerate(sizes):
        so += int(rng.integers(0, 8))
        do += int(rng.integers(0, 12))
        expected[do:do + n] = src[so:so + n]
        futs.append(a.write(smr, dmr.descriptor, length=n, src_offset=so, dst_offset=do,
                            imm=i % 5))
        so += n
        do += n
    assert all(r is None for r in await asyncio.gather(*futs))
    for k in range(5):
        await b.expect_imm(k, len(range(k, count, 5)), timeout=60)
    assert_bytes(dst, expected, f"seed={seed}")
    await settle()
    for k in range(5):
        c = b.imm_counter(k)
        assert (c.value, c.total) == (0, len(range(k, count, 5))), f"seed={seed} imm {k}"


async def test_write_length_defaults_to_rest_of_source(pair, rng, seed):
    a, b = pair
    src = random_bytes(rng, 10_000)
    dst = random_bytes(rng, 20_000)
    smr, dmr = a.register(src), b.register(dst)
    expected = dst.copy()
    expected[5_000:5_000 + 6_999] = src[3_001:]
    await a.write(smr, dmr.descriptor, src_offset=3_001, dst_offset=5_000)
    assert_bytes(dst, expected, f"seed={seed}")
    expected[:10_000] = src
    await a.write(smr, dmr.descriptor)
    assert_bytes(dst, expected, f"seed={seed}")


async def test_destination_forms(pair, rng, seed):
    """dst may be descriptor bytes, a bytearray/memoryview of them, or a RemoteRegion."""
    a, b = pair
    src = random_bytes(rng, 4 * 1000)
    dst = np.zeros(4 * 1000, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    d = dmr.descriptor
    forms = [d, bytearray(d), memoryview(d), RemoteRegion.from_bytes(d)]
    for i, form in enumerate(forms):
        await a.write(smr, form, length=1000, src_offset=i * 1000, dst_offset=i * 1000, imm=i)
    for i in range(4):
        await b.expect_imm(i, 1, timeout=30)
    assert_bytes(dst, src, f"seed={seed}")


async def test_destination_cache_keeps_regions_apart(pair, rng, seed):
    """The futures layer remembers the last destination it resolved, by
    identity.  Random writes into two regions through every form of their
    destinations -- the same RemoteRegion object again and again, equal
    copies of it, descriptor bytes, and one bytearray whose contents switch
    between the two descriptors in place (mutable: never remembered) --
    each land in the region their destination names at that moment."""
    a, b = pair
    size, n = 4096, 300
    src = random_bytes(rng, size)
    dst1, dst2 = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    smr, m1, m2 = a.register(src), b.register(dst1), b.register(dst2)
    r1, r2 = RemoteRegion.from_bytes(m1.descriptor), RemoteRegion.from_bytes(m2.descriptor)
    flip = bytearray(m1.descriptor)
    forms = {1: [r1, RemoteRegion.from_bytes(m1.descriptor), m1.descriptor],
             2: [r2, RemoteRegion.from_bytes(m2.descriptor), m2.descriptor]}
    exp = {1: dst1.copy(), 2: dst2.copy()}
    count = {1: 0, 2: 0}
    for i in range(n):
        which = int(rng.integers(1, 3))
        k = int(rng.integers(0, 4))
        if k == 3:
            flip[:] = (m1 if which == 1 else m2).descriptor
            form = flip
        else:
            form = forms[which][k]
        ln = int(rng.integers(1, 64))
        so, do = int(rng.integers(0, size - ln)), int(rng.integers(0, size - ln))
        exp[which][do:do + ln] = src[so:so + ln]
        # awaited one by one: later ranges may overlap earlier ones
        await a.write(smr, form, length=ln, src_offset=so, dst_offset=do, imm=which)
        count[which] += 1
    await b.expect_imm(1, count[1], timeout=30)
    await b.expect_imm(2, count[2], timeout=30)
    await settle()
    assert b.imm_counter(1).value == b.imm_counter(2).value == 0, "an extra immediate"
    assert_bytes(dst1, exp[1], f"seed={seed}: region 1")
    assert_bytes(dst2, exp[2], f"seed={seed}: region 2")


def _mmap_buf(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)


@pytest.mark.parametrize("kind", ["bytearray", "numpy-u8", "numpy-f32-2d", "mmap"])
async def test_buffer_kinds(pair, rng, seed, kind):
    a, b = pair
    n = 3 * 4096 + 4  # not a page multiple
    data = random_bytes(rng, n)

    def make():
        if kind == "bytearray":
            return bytearray(n)
        if kind == "numpy-u8":
            return np.zeros(n, np.uint8)
        if kind == "numpy-f32-2d":
            return np.zeros((n // 4, 1), np.float32)
        return _mmap_buf(n)

    src, dst = make(), make()
    memoryview(src).cast("B")[:] = data.tobytes()
    smr, dmr = a.register(src), b.register(dst)
    assert smr.nbytes == dmr.nbytes == n
    await a.write(smr, dmr.descriptor, imm=9)
    await b.expect_imm(9, 1, timeout=30)
    assert_bytes(bytes(memoryview(dst).cast("B")), data, f"{kind} seed={seed}")
    a.deregister(smr)
    b.deregister(dmr)
    if kind == "mmap":
        src.close()  # no export left: the mapping can be closed
        dst.close()


async def test_chunked_write_delivers_one_immediate_after_all_bytes(make_engine, provider, rng,
                                                                     seed):
    """With max_chunk the write is split into many work requests; there is
    still exactly one immediate, and it arrives after the last byte."""
    a = await make_engine(provider, max_chunk=4096)
    b = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 2 * MiB) + 123
    src = random_bytes(rng, n)
    dst = random_bytes(rng, n + 100)
    smr, dmr = a.register(src), b.register(dst)
    for imm in (0, 1, 2, IMM_MAX):
        expected = dst.copy()
        expected[50:50 + n - 7] = src[7:]
        fut = a.write(smr, dmr.descriptor, src_offset=7, dst_offset=50, imm=imm)
        try:
            await b.expect_imm(imm, 1, timeout=30)
        except TimeoutError:
            fut.cancel()  # abandoned; the engine is closed at teardown
            st = a.stats()[0]
            raise AssertionError(
                f"seed={seed} imm={imm}: no immediate after 30 s; writer: "
                f"{st['wrs_posted']} WRs posted, {st['wrs_completed']} completed") from None
        assert_bytes(dst, expected, f"seed={seed} imm={imm} (checked when the immediate arrived)")
        await fut
        src[:] = random_bytes(rng, n)
    await settle()
    for imm in (0, 1, 2, IMM_MAX):
        assert b.imm_counter(imm).total == 1
    assert a.stats()[0]["wrs_posted"] >= 4 * (n // 4096)


@pytest.mark.parametrize("imm", [0, 1, 2 ** 31, IMM_MAX, np.uint32(IMM_MAX), np.int64(77)])
async def test_immediate_values(pair, imm):
    a, b = pair
    dst = bytearray(64)
    dmr = b.register(dst)
    smr = a.register(bytearray(b"x" * 64))
    await a.write(smr, dmr.descriptor, length=8, imm=imm)
    await a.write_imm(dmr.descriptor, imm)
    await b.expect_imm(int(imm), 2, timeout=30)
    assert bytes(dst[:8]) == b"x" * 8 and bytes(dst[8:]) == bytes(56)
    await settle()
    c = b.imm_counter(int(imm))
    assert (c.value, c.total) == (0, 2)
    other = (int(imm) + 1) % 2 ** 32
    assert b.imm_counter(other).total == 0


async def test_write_imm_moves_no_bytes(pair, rng):
    a, b = pair
    dst = random_bytes(rng, 4096)
    before = dst.copy()
    dmr = b.register(dst)
    await asyncio.gather(*[a.write_imm(dmr.descriptor, 5) for _ in range(50)])
    await b.expect_imm(5, 50, timeout=30)
    assert_bytes(dst, before, "write_imm must not touch the destination")
    assert a.stats()[0]["bytes_written"] == 0


async def test_zero_length_write_without_imm(pair, rng):
    a, b = pair
    src, dst = random_bytes(rng, 16), random_bytes(rng, 16)
    before = dst.copy()
    smr, dmr = a.register(src), b.register(dst)
    assert await a.write(smr, dmr.descriptor, length=0, src_offset=16, dst_offset=16) is None
    await a.write(smr, dmr.descriptor, length=0, imm=3)
    await b.expect_imm(3, 1, timeout=30)
    assert_bytes(dst, before, "zero-length writes must not touch the destination")


async def test_bidirectional_writes(pair, provider, rng, seed):
    """Both engines write to each other at the same time."""
    a, b = pair
    n = min(MAX_TRANSFER[provider], 8 * MiB)
    sa, sb = random_bytes(rng, n), random_bytes(rng, n)
    da, db = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    msa, msb, mda, mdb = a.register(sa), b.register(sb), a.register(da), b.register(db)
    piece = n // 16
    futs = []
    for i in range(16):
        o = i * piece
        futs.append(a.write(msa, mdb.descriptor, length=piece, src_offset=o, dst_offset=o, imm=1))
        futs.append(b.write(msb, mda.descriptor, length=piece, src_offset=o, dst_offset=o, imm=2))
    await asyncio.gather(*futs, b.expect_imm(1, 16, timeout=60), a.expect_imm(2, 16, timeout=60))
    assert_bytes(db[:16 * piece], sa[:16 * piece], f"a->b seed={seed}")
    assert_bytes(da[:16 * piece], sb[:16 * piece], f"b->a seed={seed}")


async def test_write_to_own_region(make_engine, provider, rng, seed):
    """An engine may write (and send) to itself."""
    a = await make_engine(provider)
    src, dst = random_bytes(rng, 100 * KiB), np.zeros(100 * KiB + 8, np.uint8)
    smr, dmr = a.register(src), a.register(dst)
    await a.write(smr, dmr.descriptor, dst_offset=8, imm=5)
    await a.expect_imm(5, 1, timeout=30)
    assert_bytes(dst[8:], src, f"seed={seed}")
    await a.send(a.address, b"me")
    assert await a.recv(timeout=30) == b"me"


async def test_one_source_to_many_engines(make_engine, provider, rng, seed):
    """One sender, several receiver engines; every receiver checks its bytes."""
    a = await make_engine(provider)
    receivers = [await make_engine(provider) for _ in range(3)]
    src = random_bytes(rng, 300 * KiB)
    smr = a.register(src)
    dsts = [np.zeros(100 * KiB, np.uint8) for _ in receivers]
    dmrs = [r.register(d) for r, d in zip(receivers, dsts)]
    await asyncio.gather(*[a.write(smr, m.descriptor, length=100 * KiB, src_offset=i * 100 * KiB,
                                   imm=40 + i) for i, m in enumerate(dmrs)])
    for i, (r, d) in enumerate(zip(receivers, dsts)):
        await r.expect_imm(40 + i, 1, timeout=30)
        assert_bytes(d, src[i * 100 * KiB:(i + 1) * 100 * KiB], f"receiver {i} seed={seed}")
        for j in range(3):
            if j != i:
                assert r.imm_counter(40 + j).total == 0


async def test_without_delivery_complete_the_immediate_still_follows_the_bytes(
        make_engine, provider, rng, seed):
    """delivery_complete=False: the await only frees the source, but the
    immediate still arrives after the bytes (docs/semantics.md)."""
    a = await make_engine(provider, delivery_complete=False)
    b = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 8 * MiB)
    src, dst = random_bytes(rng, n), random_bytes(rng, n)
    smr, dmr = a.register(src), b.register(dst)
    for i in range(4):
        src[:] = random_bytes(rng, n)
        expected = src.copy()
        fut = a.write(smr, dmr.descriptor, imm=i)
        await b.expect_imm(i, 1, timeout=60)
        assert_bytes(dst, expected, f"seed={seed} round {i} (checked when the immediate arrived)")
        await fut


async def test_deregistered_region_is_not_written(make_engine, children, provider, seed):
    """After deregister, a peer holding the old descriptor cannot change the
    memory (peers.stale_descriptor).  On shm the writer may have to be closed
    with the stale write in flight, which can crash libfabric when both
    engines share a process: there the scenario runs in a child process."""
    await peers.run_scenario("stale_descriptor", make_engine, children, provider, seed,
                             isolate=provider == "shm")
