"""Who drives the NICs: the event loop's poll tick, or the worker.

After an engine posts, its event loop polls the NICs itself (busy_poll_us
after the last activity) and the worker stands back; the worker must take
over when the loop stops running (a long synchronous callback), and
``busy_poll_us=0`` must leave everything to the worker.  Every byte checked.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from support import KiB, assert_bytes, random_bytes, settle


def _completed(engine) -> int:
    return sum(s["wrs_completed"] for s in engine.stats())


@pytest.mark.parametrize("drove", [False, True], ids=["fresh", "after-driving"])
async def test_worker_takes_over_while_the_loop_is_blocked(make_engine, provider, rng, seed,
                                                           drove):
    """Writes posted, then the loop blocks (time.sleep in a coroutine): the
    loop's tick cannot run, so the workers must complete the writes and
    count the immediates meanwhile (seen through the synchronous stats).
    after-driving: the loop first polled without a break for 100 ms, so
    the writer's worker naps have backed off to their longest."""
    a = await make_engine(provider)
    b = await make_engine(provider)
    n, size = 64, 16 * KiB
    src = random_bytes(rng, n * size)
    dst = np.zeros(n * size, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    await a.write(smr, dmr.descriptor, length=8, imm=2)   # connected
    await b.expect_imm(2, 1, timeout=30)
    if drove:
        end, k = time.monotonic() + 0.1, 0
        while time.monotonic() < end:
            await a.write(smr, dmr.descriptor, length=size, imm=3)
            k += 1
        await b.expect_imm(3, k, timeout=30)
    before = _completed(a)
    futs = [a.write(smr, dmr.descriptor, length=size, src_offset=i * size,
                    dst_offset=i * size, imm=1) for i in range(n)]
    assert a._c.poll_starts >= 1 and a._c.poll_window > 0   # the loop drives after posting
    deadline = time.monotonic() + 30
    # (a shm copy-lane write is two work requests: its data, then its immediate
    # once the data completed, so the immediates counted show the writer's
    # worker reaping as well)
    while (_completed(a) - before < n or b.imm_counter(1).value < n) \
            and time.monotonic() < deadline:
        time.sleep(0.01)   # blocks the event loop on purpose
    done = _completed(a) - before
    counted = b.imm_counter(1).value
    assert done >= n, f"seed={seed}: only {done} of {n} writes completed while the loop was blocked"
    assert counted == n, f"seed={seed}: {counted} of {n} immediates counted while the loop was blocked"
    await asyncio.wait_for(asyncio.gather(*futs), 30)
    await b.expect_imm(1, n, timeout=30)
    assert_bytes(dst, src, f"seed={seed}: writes completed by the worker")


async def test_worker_driven_completions(make_engine, provider, rng, seed):
    """busy_poll_us=0: the loop never polls; futures resolve through the
    worker's eventfd wake-ups.  Random sizes and offsets, a ping-pong."""
    a = await make_engine(provider, busy_poll_us=0)
    b = await make_engine(provider, busy_poll_us=0)
    assert a._c.poll_window == 0
    cap = 256 * KiB
    src = random_bytes(rng, cap)
    dst = np.zeros(cap, np.uint8)
    back = np.zeros(64, np.uint8)
    smr, dmr, bmr = a.register(src), b.register(dst), a.register(back)
    expected = dst.copy()
    futs = []
    for i in range(40):
        n = int(rng.integers(0, 4 * KiB))
        so, do = int(rng.integers(0, cap - n)), int(rng.integers(0, cap - n))
        expected[do:do + n] = src[so:so + n]
        futs.append(a.write(smr, dmr.descriptor, length=n, src_offset=so, dst_offset=do,
                            imm=7))
        await asyncio.wait_for(futs[-1], 30)   # in order: later ranges may overlap earlier
    await b.expect_imm(7, 40, timeout=30)
    assert_bytes(dst, expected, f"seed={seed}: worker-driven writes")
    pong = b.register(np.arange(8, dtype=np.uint8))
    for _ in range(20):
        w = a.write(smr, dmr.descriptor, length=8, imm=8)
        await b.expect_imm(8, 1, timeout=30)
        r = b.write(pong, bmr.descriptor, length=8, imm=9)
        await a.expect_imm(9, 1, timeout=30)
        await asyncio.gather(w, r)
    assert_bytes(back[:8], np.arange(8, dtype=np.uint8), f"seed={seed}: ping-pong")
    assert a._c.poll_starts == 0 and b._c.poll_starts == 0


async def test_loop_polling_stops_after_the_window(make_engine, provider):
    """After a burst the loop stops polling (within a few ms) and hands the
    NICs back to the worker; the loop then costs nothing while idle."""
    a = await make_engine(provider)
    b = await make_engine(provider)
    smr = a.register(np.ones(4096, np.uint8))
    dmr = b.register(np.zeros(4096, np.uint8))
    await asyncio.gather(*(a.write(smr, dmr.descriptor, imm=3) for _ in range(100)))
    await b.expect_imm(3, 100, timeout=30)
    await settle(0.1)   # > busy_poll_us (200 us) and the longest adaptive window (4 ms)
    ticks = a._c.ticks
    c0 = time.process_time()
    await asyncio.sleep(0.5)
    cpu = time.process_time() - c0
    assert a._c.ticks == ticks, "the loop kept polling with nothing to do"
    assert cpu < 0.1, f"two idle engines used {cpu:.3f} s of CPU in 0.5 s"


async def test_posting_at_full_depth_does_not_progress_inline(make_engine, rng, seed):
    """With every slot of the send queue taken, write() only queues the
    operation; the loop's poll tick (or the worker) posts and progresses it
    later.  Before, each such write() polled the CQ inline, and on tcp one
    poll copies up to a megabyte into a socket: posting 2000 writes at depth
    2 held the event loop for 0.4-0.7 s, and most of them had completed
    before the caller got control back.  Counted, not timed: the work
    requests that complete while 300 writes of 1 MiB are posted."""
    a = await make_engine("tcp", tx_depth=2)
    b = await make_engine("tcp")
    size = 1 << 20
    src = random_bytes(rng, size)
    dst = np.zeros(size, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    await a.write(smr, dmr.descriptor, imm=1)   # connected
    await b.expect_imm(1, 1, timeout=30)
    before = _completed(a)
    futs = [a.write(smr, dmr.descriptor, imm=2) for _ in range(300)]
    inline = _completed(a) - before
    assert inline < 100, f"seed={seed}: {inline} of 300 writes completed while being posted"
    await asyncio.wait_for(asyncio.gather(*futs), 120)
    await b.expect_imm(2, 300, timeout=60)
    assert_bytes(dst, src, f"seed={seed}: after 300 writes at depth 2")

