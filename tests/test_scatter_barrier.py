"""engine.scatter (one immediate per target) and engine.barrier (one per destination)."""
from __future__ import annotations

import asyncio

import pytest

from aiotransfer import RemoteRegion, ScatterTarget

from support import KiB, MAX_TRANSFER, MiB, assert_bytes, random_bytes, settle


async def _receivers(make_engine, provider, n_engines, regions_per_engine, size, rng):
    engines = [await make_engine(provider) for _ in range(n_engines)]
    bufs, mrs = [], []
    for e in engines:
        bs = [random_bytes(rng, size) for _ in range(regions_per_engine)]
        bufs.append(bs)
        mrs.append([e.register(x) for x in bs])
    return engines, bufs, mrs


async def test_scatter_to_several_regions_on_several_engines(make_engine, provider, rng, seed):
    sender = await make_engine(provider)
    region = 256 * KiB
    engines, bufs, mrs = await _receivers(make_engine, provider, 3, 2, region, rng)
    src = random_bytes(rng, 2 * MiB)
    smr = sender.register(src)
    expected = [[x.copy() for x in bs] for bs in bufs]
    targets, per_engine = [], [0] * len(engines)
    # 4 disjoint slots per region; random length (sometimes 0) and offset inside each slot
    slot = region // 4
    for ei in range(len(engines)):
        for ri in range(2):
            for k in range(4):
                n = 0 if rng.random() < 0.1 else int(rng.integers(1, slot - 100))
                do = k * slot + int(rng.integers(0, slot - n))
                so = int(rng.integers(0, src.size - n))
                expected[ei][ri][do:do + n] = src[so:so + n]
                dst = mrs[ei][ri].descriptor
                if rng.random() < 0.5:
                    dst = RemoteRegion.from_bytes(dst)
                targets.append(ScatterTarget(dst, n, src_offset=so, dst_offset=do))
                per_engine[ei] += 1
    order = rng.permutation(len(targets))
    targets = [targets[i] for i in order]
    fut = sender.scatter(smr, targets, imm=0xABCDEF01)
    for ei, e in enumerate(engines):
        await e.expect_imm(0xABCDEF01, per_engine[ei], timeout=60)
        for ri in range(2):
            assert_bytes(bufs[ei][ri], expected[ei][ri],
                         f"seed={seed} engine {ei} region {ri} (checked at the immediates)")
    assert await fut is None
    await settle()
    for ei, e in enumerate(engines):
        c = e.imm_counter(0xABCDEF01)
        assert (c.value, c.total) == (0, per_engine[ei]), f"seed={seed} engine {ei}"


async def test_scatter_without_imm_and_empty(make_engine, provider, rng, seed):
    sender = await make_engine(provider)
    engines, bufs, mrs = await _receivers(make_engine, provider, 2, 1, 64 * KiB, rng)
    src = random_bytes(rng, 64 * KiB)
    smr = sender.register(src)
    assert await sender.scatter(smr, []) is None
    assert await sender.scatter(smr, [], imm=1) is None
    n = min(MAX_TRANSFER[provider], 64 * KiB)
    await sender.scatter(smr, (ScatterTarget(m[0].descriptor, n) for m in mrs))  # an iterable
    for ei in range(2):
        assert_bytes(bufs[ei][0], src, f"seed={seed} engine {ei}")
    await settle()
    for e in engines:
        assert e.stats()[0]["imms_received"] == 0


async def test_scatter_many_targets_one_engine(pair, rng, seed):
    """1000 small targets to one region: 1000 immediates, every byte in place."""
    a, b = pair
    src = random_bytes(rng, 1000 * 48)
    dst = random_bytes(rng, 1000 * 64)
    smr, dmr = a.register(src), b.register(dst)
    expected = dst.copy()
    targets = []
    for i in rng.permutation(1000):
        n = int(rng.integers(0, 49))
        expected[i * 64:i * 64 + n] = src[i * 48:i * 48 + n]
        targets.append(ScatterTarget(dmr.descriptor, n, src_offset=int(i) * 48,
                                     dst_offset=int(i) * 64))
    await asyncio.gather(a.scatter(smr, targets, imm=3), b.expect_imm(3, 1000, timeout=60))
    assert_bytes(dst, expected, f"seed={seed}")
    await settle()
    assert b.imm_counter(3).total == 1000


async def test_barrier_to_several_engines(make_engine, provider, rng):
    sender = await make_engine(provider)
    engines, bufs, mrs = await _receivers(make_engine, provider, 4, 1, 4096, rng)
    before = [b[0].copy() for b in bufs]
    dsts = [m[0].descriptor for m in mrs]
    await sender.barrier(dsts, 11)
    # a destination listed twice gets two immediates
    await sender.barrier([dsts[0], RemoteRegion.from_bytes(dsts[2]), dsts[0]], 12)
    for i, e in enumerate(engines):
        await e.expect_imm(11, 1, timeout=30)
    await engines[0].expect_imm(12, 2, timeout=30)
    await engines[2].expect_imm(12, 1, timeout=30)
    await settle()
    for i, e in enumerate(engines):
        assert (e.imm_counter(11).total, e.imm_counter(12).total) == (1, [2, 0, 1, 0][i])
        assert_bytes(bufs[i][0], before[i], f"barrier must not touch engine {i}'s bytes")
    assert await sender.barrier([], 13) is None


async def test_writes_then_barrier(make_engine, provider, rng, seed):
    """The usual pattern: await plain writes, then barrier; a receiver that
    sees the barrier's immediate sees all the bytes."""
    sender = await make_engine(provider)
    engines, bufs, mrs = await _receivers(make_engine, provider, 3, 1, 512 * KiB, rng)
    src = random_bytes(rng, 512 * KiB)
    smr = sender.register(src)
    await asyncio.gather(*[sender.write(smr, m[0].descriptor) for m in mrs])
    await sender.barrier([m[0].descriptor for m in mrs], 2 ** 32 - 1)
    for i, e in enumerate(engines):
        await e.expect_imm(2 ** 32 - 1, 1, timeout=30)
        assert_bytes(bufs[i][0], src, f"seed={seed} engine {i}")


@pytest.mark.parametrize("n_writers", [3])
async def test_many_writers_one_receiver_barrier(make_engine, provider, n_writers):
    """Several engines barrier to one receiver: the counts add up."""
    receiver = await make_engine(provider)
    dmr = receiver.register(bytearray(8))
    writers = [await make_engine(provider) for _ in range(n_writers)]
    await asyncio.gather(*[w.barrier([dmr.descriptor] * 5, 99) for w in writers])
    await receiver.expect_imm(99, 5 * n_writers, timeout=30)
    await settle()
    assert receiver.imm_counter(99).total == 5 * n_writers
