"""The engine on uvloop's event loop (vLLM and other servers run one).

On a loop other than asyncio's own the futures layer takes the general
paths: the poll tick goes through ``call_soon`` and futures through
``loop.create_future``.  Real transfers, every byte checked.  Skipped when
uvloop is not installed (``make test`` installs it).
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiotransfer
from aiotransfer import EngineClosedError

from support import KiB, assert_bytes, nics_for, random_bytes

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")


def _run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 120))


def _engines(provider: str):
    kw = {"nics": nics_for(provider)}
    return aiotransfer.TransferEngine(provider, **kw), aiotransfer.TransferEngine(provider, **kw)


def test_writes_pages_and_immediates_on_uvloop(provider, rng, seed):
    """Concurrent writes of random sizes and offsets into disjoint slots, a
    paged write over random page lists, immediates before and after
    expect_imm, a ping-pong: all on uvloop."""
    async def main() -> None:
        a, b = _engines(provider)
        async with a, b:
            assert "uvloop" in type(asyncio.get_running_loop()).__module__
            slot, n = 16 * KiB, 64
            src = random_bytes(rng, n * slot)
            dst = np.zeros(n * slot, np.uint8)
            smr, dmr = a.register(src), b.register(dst)
            d = dmr.descriptor
            expected = dst.copy()
            early = await asyncio.gather(*(a.write_imm(d, 9) for _ in range(3)))
            assert early == [None] * 3
            futs = []
            for i in range(n):
                ln = int(rng.integers(0, slot + 1))
                so = i * slot + int(rng.integers(0, slot - ln + 1))
                do = i * slot + int(rng.integers(0, slot - ln + 1))
                expected[do:do + ln] = src[so:so + ln]
                futs.append(a.write(smr, d, length=ln, src_offset=so, dst_offset=do, imm=1))
            await asyncio.gather(*futs)
            await b.expect_imm(1, n, timeout=30)
            await b.expect_imm(9, 3, timeout=30)      # arrived before the call
            assert_bytes(dst, expected, f"seed={seed}: writes on uvloop")

            page = 512
            psrc = random_bytes(rng, 256 * page)
            pdst = np.zeros(256 * page, np.uint8)
            pm, qm = a.register(psrc), b.register(pdst)
            sp = rng.permutation(256)[:100]
            dp = rng.permutation(256)[:100]
            await a.write_paged(pm, sp, qm.descriptor, dp, page_size=page, imm=2)
            await b.expect_imm(2, 100, timeout=30)
            pexp = np.zeros_like(pdst)
            for s_, d_ in zip(sp, dp):
                pexp[d_ * page:(d_ + 1) * page] = psrc[s_ * page:(s_ + 1) * page]
            assert_bytes(pdst, pexp, f"seed={seed}: paged write on uvloop")

            back = np.zeros(8, np.uint8)
            bm = a.register(back)
            pong = b.register(np.arange(8, dtype=np.uint8))
            for _ in range(20):
                w = a.write(smr, d, length=8, imm=3)
                await b.expect_imm(3, 1, timeout=30)
                r = b.write(pong, bm.descriptor, length=8, imm=4)
                await a.expect_imm(4, 1, timeout=30)
                await asyncio.gather(w, r)
            assert_bytes(back, np.arange(8, dtype=np.uint8), "ping-pong on uvloop")

    _run(main())


def test_close_with_writes_in_flight_on_uvloop(provider, rng, seed):
    """Closing the writer on uvloop ends every pending future (None or
    EngineClosedError) and every waiter; nothing hangs."""
    async def main() -> None:
        a, b = _engines(provider)
        async with b:
            await a.start()
            src = random_bytes(rng, 1 << 20)
            dst = np.zeros(1 << 20, np.uint8)
            smr, d = a.register(src), b.register(dst).descriptor
            futs = [a.write(smr, d, length=64 * KiB, src_offset=(i % 16) * 64 * KiB,
                            dst_offset=(i % 16) * 64 * KiB, imm=1) for i in range(200)]
            waiter = asyncio.ensure_future(a.expect_imm(77, 1))
            await asyncio.sleep(0)
            await a.close()
            results = await asyncio.gather(*futs, return_exceptions=True)
            bad = [r for r in results if r is not None and not isinstance(r, EngineClosedError)]
            assert not bad, f"seed={seed}: unexpected outcomes {bad[:3]}"
            with pytest.raises(EngineClosedError):
                await waiter
            with pytest.raises(EngineClosedError):
                a.write(smr, d, length=8)

    _run(main())
