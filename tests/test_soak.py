"""Long soak / scale tests: only with --run-slow."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aiotransfer import ScatterTarget

import peers
from support import KiB, MAX_TRANSFER, MiB, assert_bytes, random_bytes, settle
from test_multiprocess import run_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_soak_mixed_operations(make_engine, provider, rng, seed):
    """Hundreds of rounds of random writes, paged writes, scatters, barriers
    and messages from two senders to two receivers, all verified."""
    senders = [await make_engine(provider) for _ in range(2)]
    receivers = [await make_engine(provider) for _ in range(2)]
    size = 2 * MiB
    srcs = [random_bytes(rng, size) for _ in senders]
    smrs = [s.register(x) for s, x in zip(senders, srcs)]
    dsts = [np.zeros(size, np.uint8) for _ in receivers]
    dmrs = [r.register(x) for r, x in zip(receivers, dsts)]
    rounds = 2000 if provider != "udp" else 600
    for round_ in range(rounds):
        expected = [d.copy() for d in dsts]
        imms = [dict() for _ in receivers]
        futs = []
        cursor = [0, 0]
        ctx = f"seed={seed} round {round_}"

        def slot(r: int, n: int) -> int | None:
            do = cursor[r] + int(rng.integers(0, 100))
            if do + n > size:
                return None
            cursor[r] = do + n
            return do

        for _ in range(int(rng.integers(1, 30))):
            si, ri = int(rng.integers(0, 2)), int(rng.integers(0, 2))
            kind = rng.choice(["write", "paged", "scatter", "barrier", "send"])
            imm = int(rng.integers(0, 2 ** 32)) if rng.random() < 0.7 else None
            if kind == "write":
                n = int(rng.integers(0, 128 * KiB))
                do = slot(ri, n)
                if do is None:
                    continue
                so = int(rng.integers(0, size - n + 1))
                expected[ri][do:do + n] = srcs[si][so:so + n]
                futs.append(senders[si].write(smrs[si], dmrs[ri].descriptor, length=n,
                                              src_offset=so, dst_offset=do, imm=imm))
                if imm is not None:
                    imms[ri][imm] = imms[ri].get(imm, 0) + 1
            elif kind == "paged":
                ps, npages = int(rng.choice([64, 4096, 4097])), int(rng.integers(1, 20))
                base = slot(ri, ps * npages)
                if base is None:
                    continue
                sp = rng.integers(0, size // ps, npages)
                dp = rng.permutation(npages)
                for s, dd in zip(sp, dp):
                    expected[ri][base + dd * ps:base + dd * ps + ps] = srcs[si][s * ps:s * ps + ps]
                futs.append(senders[si].write_paged(smrs[si], sp, dmrs[ri].descriptor,
                                                    list(map(int, dp)), page_size=ps,
                                                    dst_offset=base, imm=imm))
                if imm is not None:
                    imms[ri][imm] = imms[ri].get(imm, 0) + npages
            elif kind == "scatter":
                targets = []
                for _ in range(int(rng.integers(1, 6))):
                    r2, n = int(rng.integers(0, 2)), int(rng.integers(0, 16 * KiB))
                    do = slot(r2, n)
                    if do is None:
                        continue
                    so = int(rng.integers(0, size - n + 1))
                    expected[r2][do:do + n] = srcs[si][so:so + n]
                    targets.append(ScatterTarget(dmrs[r2].descriptor, n, so, do))
                    if imm is not None:
                        imms[r2][imm] = imms[r2].get(imm, 0) + 1
                futs.append(senders[si].scatter(smrs[si], targets, imm=imm))
            elif kind == "barrier":
                v = int(rng.integers(0, 2 ** 32))
                futs.append(senders[si].barrier([d.descriptor for d in dmrs], v))
                for r2 in range(2):
                    imms[r2][v] = imms[r2].get(v, 0) + 1
            else:
                futs.append(senders[si].send(receivers[ri].address, b"r%d" % round_))
                imms[ri][("msg",)] = imms[ri].get(("msg",), 0) + 1
        await asyncio.wait_for(asyncio.gather(*futs), 120)
        for ri, r in enumerate(receivers):
            for imm, count in imms[ri].items():
                if imm == ("msg",):
                    for _ in range(count):
                        assert await r.recv(timeout=60) == b"r%d" % round_, ctx
                else:
                    await r.expect_imm(imm, count, timeout=60)
            assert_bytes(dsts[ri], expected[ri], f"{ctx} receiver {ri}")
    await settle(0.2)
    for r in receivers:
        with pytest.raises(TimeoutError):
            await r.recv(timeout=0.01)


async def test_hundred_thousand_concurrent_writes(pair, provider, rng, seed):
    a, b = pair
    n, slot = 100_000, 16
    src = random_bytes(rng, n * slot)
    dst = np.zeros(n * slot, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    futs = [a.write(smr, dmr.descriptor, length=slot, src_offset=i * slot, dst_offset=i * slot,
                    imm=i % 3) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*futs), 600)
    for k in range(3):
        await b.expect_imm(k, len(range(k, n, 3)), timeout=120)
    assert_bytes(dst, src, f"seed={seed}")
    await settle(0.2)
    assert b.stats()[0]["imms_received"] == n


async def test_big_writes_repeated(pair, provider, rng, seed):
    a, b = pair
    cap = MAX_TRANSFER[provider]
    src, dst = random_bytes(rng, cap), np.zeros(cap, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    for i in range(10):
        src[:] = random_bytes(rng, cap)
        fut = a.write(smr, dmr.descriptor, imm=i)
        await b.expect_imm(i, 1, timeout=120)
        assert_bytes(dst, src, f"seed={seed} round {i}")
        await fut


@pytest.mark.parametrize("round_", range(4))
async def test_cross_process_repeated(make_engine, children, provider, rng, seed, round_):
    """Fresh receiver processes over and over, each checking a random plan."""
    engine = await make_engine(provider)
    pb = peers.PlanBuilder(rng, provider, 2, regions=[8 * MiB, 1 * MiB],
                           src_size=min(MAX_TRANSFER[provider], 8 * MiB))
    for r in range(2):
        pb.plans[r]["parent_address"] = engine.address
        for _ in range(40):
            pb.write(r, int(rng.integers(0, 2)), int(rng.integers(0, 256 * KiB)),
                     imm=int(rng.integers(0, 8)))
        pb.paged(r, 0, 50, 4096, imm=99, as_list=bool(round_ % 2))
        pb.message(r, random_bytes(rng, 65536).tobytes())
    pb.scatter([(int(rng.integers(0, 2)), 1, 1000) for _ in range(20)], imm=98)
    pb.barrier([(0, 0), (1, 1)], 97)
    await run_plan(engine, children, provider, pb, seed)
