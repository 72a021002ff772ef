"""The shm copy lane (``TransferEngine(copy_lane=...)``, docs/benchmarks.md):
on shm the first endpoint's writes of at least 64 KiB
(``$AIOTRANSFER_COPY_LANE_MIN``) and at most 16 MiB
are copied by the writer inside its post (libfabric's fast RMA path: no
remote CQ data, no delivery-complete), and each write's immediate follows
as a zero-byte write once the data completed.  Every byte checked, every
immediate counted exactly once, in one process and across processes."""
from __future__ import annotations

import asyncio
import multiprocessing as mp

import numpy as np
import pytest

import aiotransfer

from conftest import require_provider
from support import KiB, MiB, assert_bytes, random_bytes, settle

COPY_MIN = 64 * KiB     # the smallest write the lane takes ($AIOTRANSFER_COPY_LANE_MIN)
COPY_MAX = 16 * MiB


def _copied(engine) -> int:
    return sum(s["wrs_copied"] for s in engine.stats())


def _lanes(engine) -> list[bool]:
    """Which of the engine's endpoints are copy lanes (the core's NIC facts)."""
    return [engine._core.nic_info(i)["copy_lane"] for i in range(engine._core.nic_count())]


@pytest.fixture
def shm_only(request):
    """shm (the copy lane is libfabric shm's fast RMA path), skipped with the
    probe's reason where it cannot be opened."""
    require_provider(request.config, "shm")
    return "shm"


async def test_copy_lane_on_shm_only(make_engine, provider, monkeypatch):
    """shm opens endpoint 0 as a copy lane by default; other providers never
    do, even when asked; $AIOTRANSFER_COPY_LANE=0 and copy_lane=False turn it off."""
    monkeypatch.delenv("AIOTRANSFER_COPY_LANE", raising=False)
    monkeypatch.delenv("AIOTRANSFER_ENDPOINTS", raising=False)
    e = await make_engine(provider)
    assert _lanes(e) == ([True, False] if provider == "shm" else [False])
    asked = await make_engine(provider, copy_lane=True, endpoints=2)
    assert _lanes(asked) == ([True, False] if provider == "shm" else [False, False])
    off = await make_engine(provider, copy_lane=False)
    assert not any(_lanes(off))
    monkeypatch.setenv("AIOTRANSFER_COPY_LANE", "0")
    env_off = await make_engine(provider)
    assert not any(_lanes(env_off))
    one = await make_engine(provider, endpoints=1, copy_lane=True)
    assert _lanes(one) == [False], "one endpoint: nothing left for the target to copy"


@pytest.mark.parametrize("value", ["yes", "2", ""])
def test_copy_lane_environment_is_checked(monkeypatch, value):
    monkeypatch.setenv("AIOTRANSFER_COPY_LANE", value)
    with pytest.raises(ValueError, match=r"\$AIOTRANSFER_COPY_LANE=.* must be 0 or 1"):
        aiotransfer.TransferEngine("shm")


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "no-lane"])
async def test_random_writes_with_and_without_the_copy_lane(make_engine, shm_only, lane, rng,
                                                            seed):
    """Random sizes (0 B to 16 MiB + 1, so some above the lane's 16 MiB bound and
    some just under its 64 KiB minimum), offsets and immediates, with and
    without an immediate, some chunked (max_chunk): every byte lands, every
    immediate is counted exactly once, and the lane took work iff it is on."""
    a = await make_engine("shm", copy_lane=lane)
    b = await make_engine("shm", copy_lane=lane)
    chunked = await make_engine("shm", copy_lane=lane, max_chunk=96 * KiB)
    cap = 80 * MiB
    src = random_bytes(rng, cap)
    dst = np.zeros(cap, np.uint8)
    smr, cmr = a.register(src), chunked.register(src)
    dmr = b.register(dst)
    expected = dst.copy()
    sizes = [0, 1, 4096, 4097, COPY_MIN - 1, COPY_MIN, COPY_MAX, COPY_MAX + 1] + \
        [int(x) for x in rng.integers(0, 512 * KiB, 40)] + [int(rng.integers(1, 12 * MiB))]
    # disjoint destination ranges, in a random order, from random sources
    rng.shuffle(sizes)
    futs, counts, pos = [], {}, 0
    for k, n in enumerate(sizes):
        so = int(rng.integers(0, cap - n + 1))
        assert pos + n <= cap
        expected[pos:pos + n] = src[so:so + n]
        imm = None if k % 5 == 4 else int(rng.integers(0, 4))
        if imm is not None:
            counts[imm] = counts.get(imm, 0) + 1
        sender, mr = (chunked, cmr) if k % 3 == 2 else (a, smr)
        futs.append(sender.write(mr, dmr.descriptor, length=n, src_offset=so, dst_offset=pos,
                                 imm=imm))
        pos += n
    await asyncio.wait_for(asyncio.gather(*futs), 120)
    for imm, count in counts.items():
        await b.expect_imm(imm, count, timeout=30)
    assert_bytes(dst, expected, f"seed={seed} copy_lane={lane}")
    await settle()
    for imm in counts:
        assert b.imm_counter(imm).value == 0, f"seed={seed}: imm {imm} counted twice"
    assert sum(s["imms_duplicate"] for s in b.stats()) == 0
    copied = _copied(a) + _copied(chunked)
    if lane:
        assert copied > 0, f"seed={seed}: the copy lane took no write"
        per_ep = a.stats(per_endpoint=True)
        assert per_ep[1]["wrs_copied"] == 0, "only endpoint 0 is a copy lane"
    else:
        assert copied == 0


async def test_copy_lane_write_completes_after_its_bytes_and_its_immediate_follows(
        make_engine, shm_only, rng, seed):
    """One awaited write at a time over the copy lane: when it resolves the
    bytes are in place; the immediate arrives (once) right after."""
    a = await make_engine("shm")
    b = await make_engine("shm")
    size = 256 * KiB
    src = random_bytes(rng, size * 8)
    dst = np.zeros(size * 8, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    before = _copied(a)
    for i in range(8):
        await a.write(smr, dmr.descriptor, length=size, src_offset=i * size,
                      dst_offset=i * size, imm=40 + i)
        assert_bytes(dst[i * size:(i + 1) * size], src[i * size:(i + 1) * size],
                     f"seed={seed}: write {i} resolved before its bytes were placed")
        await b.expect_imm(40 + i, 1, timeout=30)
    assert _copied(a) > before, "no write took the copy lane"


@pytest.mark.parametrize("minimum", [None, 8 * KiB], ids=["default", "env-8KiB"])
async def test_copy_lane_takes_only_writes_of_its_minimum_and_up(make_engine, shm_only, rng,
                                                                seed, monkeypatch, minimum):
    """Writes under the minimum (64 KiB, or $AIOTRANSFER_COPY_LANE_MIN)
    never take the lane, however many are in flight; writes of the minimum
    do.  Every byte and immediate checked."""
    if minimum is None:
        monkeypatch.delenv("AIOTRANSFER_COPY_LANE_MIN", raising=False)
        low = COPY_MIN
    else:
        monkeypatch.setenv("AIOTRANSFER_COPY_LANE_MIN", str(minimum))
        low = minimum
    a = await make_engine("shm")
    b = await make_engine("shm")
    n = 24
    src = random_bytes(rng, 2 * n * low)
    dst = np.zeros(src.size, np.uint8)
    smr, dmr = a.register(src), b.register(dst)

    async def burst(size: int, base: int, imm: int) -> None:
        await asyncio.wait_for(asyncio.gather(*[
            a.write(smr, dmr.descriptor, length=size, src_offset=base + i * size,
                    dst_offset=base + i * size, imm=imm) for i in range(n)]), 60)
        await b.expect_imm(imm, n, timeout=30)

    await burst(low - 1, 0, 1)
    assert _copied(a) == 0, f"seed={seed}: a write of {low - 1} B took the copy lane"
    await burst(low, n * (low - 1), 2)
    assert _copied(a) > 0, f"seed={seed}: no write of {low} B took the copy lane"
    end = n * (low - 1) + n * low
    assert_bytes(dst[:end], src[:end], f"seed={seed}")
    await settle()
    assert b.imm_counter(1).value == 0 and b.imm_counter(2).value == 0


async def test_large_posts_let_other_threads_run(make_engine, shm_only, rng, seed):
    """A 16 MiB write over the copy lane is copied inside its post (about a
    millisecond): the post releases the GIL, so another Python thread runs
    meanwhile.  With a switch interval of 10 s the GIL changes hands only
    where its holder lets go, so any step the other thread takes during a
    synchronous write() call is one the post allowed.  Every byte checked."""
    import sys
    import threading
    import time

    a = await make_engine("shm")
    b = await make_engine("shm")
    size, n = COPY_MAX, 8
    src = random_bytes(rng, size * n)
    dst = np.zeros(size * n, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    # first contact (the peer's token slot) queues writes: have it behind us
    await a.write(smr, dmr.descriptor, length=size, imm=6)
    await b.expect_imm(6, 1, timeout=30)
    steps = [0]
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            steps[0] += 1
            time.sleep(20e-6)     # lets go of the GIL

    interval = sys.getswitchinterval()
    t = threading.Thread(target=other, daemon=True)
    sys.setswitchinterval(10.0)
    t.start()
    try:
        during, futs = [], []
        for i in range(n):
            before = steps[0]
            futs.append(a.write(smr, dmr.descriptor, length=size, src_offset=i * size,
                                dst_offset=i * size, imm=5))
            during.append(steps[0] - before)
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        t.join(10)
    await asyncio.wait_for(asyncio.gather(*futs), 60)
    await b.expect_imm(5, n, timeout=30)
    assert_bytes(dst, src, f"seed={seed}")
    assert _copied(a) > 0, "no write took the copy lane"
    assert max(during) > 0, f"the other thread never ran during a write() call: {during}"


async def test_long_loop_polls_release_the_gil(make_engine, shm_only, rng, seed):
    """A poll of the loop that posts queued work can take milliseconds (a
    shm copy-lane write of 16 MiB is copied inside its post): after a poll
    that long the next one releases the GIL (other Python threads run
    meanwhile); polls of small work keep it.  At a send-queue depth of 1,
    16 MiB writes wait in the queue and the loop's ticks post them, so such
    polls must come.  (Not a tcp stream: whether its polls are long depends
    on how full the socket is.)  Every byte checked."""
    a = await make_engine("shm", tx_depth=1)
    b = await make_engine("shm")
    size, n = 16 << 20, 8
    src = random_bytes(rng, size * n)
    dst = np.zeros(size * n, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    await a.write(smr, dmr.descriptor, length=8, imm=2)   # connected
    await b.expect_imm(2, 1, timeout=30)
    before = a._c.ticks_nogil
    futs = [a.write(smr, dmr.descriptor, length=size, src_offset=i * size,
                    dst_offset=i * size, imm=1) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*futs), 60)
    await b.expect_imm(1, n, timeout=30)
    assert_bytes(dst, src, f"seed={seed}")
    assert _copied(a) > 0, "no write took the copy lane"
    assert a._c.ticks_nogil > before, f"no poll released the GIL ({a._c.ticks} ticks)"


def _peer_main(conn, size, n):
    """A separate process: an engine whose region the parent writes into,
    then one that writes back into the parent's region."""
    async def run():
        async with aiotransfer.TransferEngine("shm") as eng:
            dst = np.zeros(size * n, np.uint8)
            mr = eng.register(dst)
            conn.send(mr.descriptor)
            await eng.expect_imm(7, n, timeout=60)
            conn.send(bytes(dst))
            back = conn.recv()
            src = np.frombuffer(bytes(dst), np.uint8).copy()
            smr = eng.register(src)
            await asyncio.gather(*[eng.write(smr, back, length=size, src_offset=i * size,
                                             dst_offset=i * size, imm=8) for i in range(n)])
            conn.send(sum(s["wrs_copied"] for s in eng.stats()))
    asyncio.run(run())


async def test_copy_lane_across_processes(make_engine, shm_only, rng, seed):
    """Two processes: the copy lane copies into another process's memory
    (process_vm_writev), both ways; every byte and immediate checked."""
    size, n = 192 * KiB, 40
    src = random_bytes(rng, size * n)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer_main, args=(child, size, n), daemon=True)
    proc.start()
    try:
        loop = asyncio.get_running_loop()
        recv = lambda: loop.run_in_executor(None, parent.recv)  # noqa: E731
        desc = await asyncio.wait_for(recv(), 60)
        a = await make_engine("shm")
        smr = a.register(src)
        await asyncio.wait_for(asyncio.gather(*[
            a.write(smr, desc, length=size, src_offset=i * size, dst_offset=i * size, imm=7)
            for i in range(n)]), 60)
        got = np.frombuffer(await asyncio.wait_for(recv(), 60), np.uint8)
        assert_bytes(got, src, f"seed={seed}: parent to child")
        assert _copied(a) > 0
        back = np.zeros(size * n, np.uint8)
        bmr = a.register(back)
        parent.send(bmr.descriptor)
        child_copied = await asyncio.wait_for(recv(), 60)
        await a.expect_imm(8, n, timeout=30)
        assert_bytes(back, src, f"seed={seed}: child to parent")
        assert child_copied > 0
        await settle()
        assert a.imm_counter(8).value == 0
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert proc.exitcode == 0


async def test_deregister_ends_copy_lane_writes(make_engine, shm_only, rng, seed):
    """libfabric 1.17's shm checks no key on the copy lane's path (the writer
    copies into the target's memory itself), so until session 13 a write
    through the descriptor of a deregistered region landed all the same
    (every byte of 1 MiB, and the write succeeded).  The target's key table
    (csrc/shm_keys.c) now admits a copy only while the region is
    registered, and deregister() waits out a copy under way: five rounds of
    a writer streaming 1 MiB writes, the region deregistered in the middle
    of the stream; from the moment deregister() returns no byte changes,
    the bytes that landed before are the source's, and the writer's copy
    lane both copied (before) and was refused (after)."""
    size, window = 1 * MiB, 8
    src = random_bytes(rng, window * size) | 1          # no zero byte: untouched is 0
    for round_ in range(5):
        a = await make_engine("shm")
        b = await make_engine("shm")
        smr = a.register(src)
        dst = np.zeros(window * size, np.uint8)
        dmr = b.register(dst)
        d = dmr.descriptor
        stop = False
        futs: list = []

        async def stream() -> None:
            while not stop:
                batch = [a.write(smr, d, length=size, src_offset=i * size,
                                 dst_offset=i * size, imm=1) for i in range(window)]
                futs.extend(batch)
                # (after the deregistration shm drops the writes: they pend)
                await asyncio.wait(batch, timeout=0.5)

        streamer = asyncio.create_task(stream())
        await b.expect_imm(1, 1, timeout=30)
        await asyncio.sleep(float(rng.uniform(0, 0.02)))
        b.deregister(dmr)
        after = dst.copy()
        await asyncio.sleep(0.3)                          # the stream goes on meanwhile
        stop = True
        await asyncio.wait_for(streamer, 30)
        where = f"seed={seed} round {round_}"
        assert_bytes(dst, after, f"{where}: bytes changed after deregister() returned")
        landed = dst != 0
        assert (dst[landed] == src[landed]).all(), f"{where}: bytes not the source's"
        stats = a.stats()
        assert _copied(a) > 0, f"{where}: the copy lane copied nothing: {stats}"
        assert sum(s["copies_refused"] for s in stats) > 0, \
            f"{where}: no copy refused after the deregistration: {stats}"
        await asyncio.wait_for(a.close(), 30)             # fails the pending writes
        await asyncio.wait_for(b.close(), 30)
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(r is None or isinstance(r, aiotransfer.TransferError) for r in results), \
            f"{where}: {[r for r in results if r is not None][:3]}"
