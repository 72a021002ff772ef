"""Engines in separate processes (multiprocessing "spawn"): addresses and
descriptors travel through a Pipe; the receiving process checks every byte,
every immediate count and every message itself."""
from __future__ import annotations

import asyncio
import faulthandler

import numpy as np
import pytest

from aiotransfer import TransferError

import peers
from support import (KiB, MAX_TRANSFER, MiB, assert_bytes, random_bytes, remove_shm_leftovers,
                     settle)

pytestmark = pytest.mark.timeout(240)


async def expect(conn, kind: str, timeout: float = peers.STEP_TIMEOUT):
    """The next message from a child, which must be of ``kind``."""
    try:
        msg = await peers.pipe_recv(conn, timeout)
    except EOFError:
        raise AssertionError(f"child went away while we waited for {kind!r}") from None
    if msg[0] == "error":
        raise AssertionError(f"child failed:\n{msg[1]}")
    assert msg[0] == kind, f"expected {kind!r} from the child, got {msg!r:.300}"
    return msg[1:]


async def join(proc, timeout: float = 60.0) -> int:
    await asyncio.to_thread(proc.join, timeout)
    assert proc.exitcode is not None, f"child {proc.pid} did not exit"
    return proc.exitcode


async def run_plan(engine, children, provider: str, pb, seed: int) -> None:
    """Start one receiver process per plan of `pb`, run its operations from
    `engine`, and check that every receiver found every byte and immediate."""
    procs = [children.start(peers.receiver_main, provider, plan) for plan in pb.plans]
    ready = [await expect(conn, "ready") for _, conn in procs]
    smr = engine.register(pb.src)
    await peers.run_ops(engine, smr, pb.ops, [d for _, d in ready], [a for a, _ in ready])
    for _, conn in procs:
        conn.send(("done", None))
    for r, (_, conn) in enumerate(procs):
        (errors,) = await expect(conn, "result")
        assert errors == [], f"seed={seed}: receiver {r} found:\n" + "\n".join(errors)
    for _, conn in procs:
        conn.send(("bye",))
    for proc, _ in procs:
        assert await join(proc) == 0


def _random_ops(pb: peers.PlanBuilder, rng, rcv: int, region: int, n_writes: int) -> None:
    for i in range(n_writes):
        n = 0 if i == 0 else int(rng.integers(1, 64 * KiB))
        pb.write(rcv, region, n, imm=int(rng.integers(0, 4)) if rng.random() < 0.8 else None)
    pb.paged(rcv, region, 17, 4096, imm=10, as_list=True)
    pb.paged(rcv, region, 9, 1000, imm=None, as_list=False)
    pb.paged(rcv, region, 31, 33, imm=11, as_list=False)


async def test_cross_process_transfer(make_engine, children, provider, rng, seed):
    """One receiver process: a big write (64 MiB; 4 MiB on udp), random
    writes, paged writes, a scatter, write_imm, a barrier and messages; the
    receiver checks everything, then writes its big region back to us."""
    engine = await make_engine(provider)
    cap = MAX_TRANSFER[provider]
    pb = peers.PlanBuilder(rng, provider, 1, regions=[cap + 64 * KiB, 4 * MiB],
                           src_size=cap + 64 * KiB)
    pb.plans[0]["parent_address"] = engine.address
    assert pb.write(0, 0, cap - int(rng.integers(0, 1000)), imm=0xFFFFFFFF)
    _random_ops(pb, rng, 0, 1, 30)
    pb.scatter([(0, 1, int(rng.integers(0, 8 * KiB))) for _ in range(10)], imm=12)
    for _ in range(5):
        pb.write_imm(0, 1, 13)
    pb.barrier([(0, 0), (0, 1), (0, 1)], 14)
    for data in [b"", b"hello", random_bytes(rng, 65536).tobytes(),
                 *(random_bytes(rng, int(rng.integers(0, 3000))).tobytes() for _ in range(7))]:
        pb.message(0, data)
    plan = pb.plans[0]

    proc, conn = children.start(peers.receiver_main, provider, plan)
    address, descs = await expect(conn, "ready")
    smr = engine.register(pb.src)
    await peers.run_ops(engine, smr, pb.ops, [descs], [address])
    echo = np.zeros(plan["regions"][0], np.uint8)
    emr = engine.register(echo)
    conn.send(("done", emr.descriptor))
    (errors,) = await expect(conn, "result")
    assert errors == [], f"seed={seed}: the receiver found:\n" + "\n".join(errors)
    # the other direction
    await engine.expect_imm(peers.ECHO_IMM, 1, timeout=60)
    assert_bytes(echo, peers.expected_regions(plan)[0], f"seed={seed}: echo from the child")
    assert await engine.recv(timeout=30) == b"echo-done"
    conn.send(("bye",))
    assert await join(proc) == 0


async def test_cross_process_scatter_and_barrier(make_engine, children, provider, rng, seed):
    """Three receiver processes: scatters and barriers that span all of them."""
    engine = await make_engine(provider)
    n = 3
    pb = peers.PlanBuilder(rng, provider, n, regions=[1 * MiB, 256 * KiB],
                           src_size=min(MAX_TRANSFER[provider], 2 * MiB))
    for r in range(n):
        pb.plans[r]["parent_address"] = engine.address
    for k in range(4):
        parts = [(int(rng.integers(0, n)), int(rng.integers(0, 2)), int(rng.integers(0, 32 * KiB)))
                 for _ in range(12)]
        pb.scatter(parts, imm=20 + k if k < 3 else None)
    pb.barrier([(r, g) for r in range(n) for g in range(2)], 30)
    pb.barrier([(0, 0), (2, 1)], 31)
    for r in range(n):
        _random_ops(pb, rng, r, 0, 5)
        pb.message(r, b"to %d" % r)
    await run_plan(engine, children, provider, pb, seed)


@pytest.mark.parametrize("how", ["close", "kill"])
async def test_cross_process_sender_goes_away_mid_flight(make_engine, children, provider, how,
                                                         rng, seed):
    """A writer process closes its engine (or is SIGKILLed) with 2000 writes
    in flight to us.  Its futures end with EngineClosedError (close); our
    engine survives and still receives from a new writer."""
    target = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 2 * MiB)
    dst = np.zeros(n, np.uint8)
    dmr = target.register(dst)
    proc, conn = children.start(peers.writer_main, provider, how, seed)
    try:
        conn.send(("target", dmr.descriptor))
        await expect(conn, "writing")
        if how == "kill":
            await target.expect_imm(2, 1, timeout=60)  # some writes surely landed
            proc.kill()
        else:
            (report,) = await expect(conn, "closed")
            assert report["bad"] == [], report
            assert report["closed"] > 0, f"no write was in flight at close: {report}"
        exitcode = await join(proc)
        assert exitcode == (-9 if how == "kill" else 0)
    finally:
        if how == "kill" and provider == "shm":
            remove_shm_leftovers(proc.pid)
    # the target still works
    await settle(0.2)
    sender = await make_engine(provider)
    src = random_bytes(rng, n)
    await sender.write(sender.register(src), dmr.descriptor, imm=77)
    await target.expect_imm(77, 1, timeout=60)
    assert_bytes(dst, src, f"seed={seed}: target after its writer went away ({how})")
    await sender.send(target.address, b"ok")
    assert await target.recv(timeout=30) == b"ok"


@pytest.mark.parametrize("how", ["close", "kill"])
async def test_cross_process_target_goes_away_mid_flight(make_engine, children, provider, how,
                                                         rng):
    """The target process closes its engine (or is SIGKILLed) while we have
    writes in flight to it: every future ends (None or TransferError) at the
    latest when we close, and nothing hangs.  (Across processes this is safe
    for shm too.)"""
    writer = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 1 * MiB)
    plan = {"regions": [n], "fill_seed": 1, "src_seed": 2, "src_size": 1, "placements": [],
            "imms": {}, "messages": [], "parent_address": writer.address}
    proc, conn = children.start(peers.receiver_main, provider, plan)
    try:
        address, descs = await expect(conn, "ready")
        smr = writer.register(random_bytes(rng, n))
        await writer.write(smr, descs[0])
        futs = [writer.write(smr, descs[0], imm=5) for _ in range(100)]
        if how == "kill":
            proc.kill()
        else:
            conn.send(("done", None))  # the child checks, reports, then closes on "bye"
            await expect(conn, "result")
            conn.send(("bye",))
        await join(proc)
    finally:
        if how == "kill" and provider == "shm":
            remove_shm_leftovers(proc.pid)
    await asyncio.wait(futs, timeout=1)
    await asyncio.wait_for(writer.close(), 30)
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    assert all(r is None or isinstance(r, TransferError) for r in results), \
        {type(r).__name__ for r in results}


@pytest.mark.timeout(120, method="thread")
async def test_shm_target_dead_holding_its_region_lock(make_engine, children, provider):
    """libfabric 1.17's shm target holds its region's spin lock while it
    copies; killed then, the lock stays taken and a writer's next post would
    spin in fi_writemsg for ever (the event loop with it).  The child takes
    its own locks and is SIGKILLed; our next writes must still end, with a
    TransferError once the peer timeout passes, and the engine reports the
    released locks.  (Without csrc/shm_unstick.c the loop spins holding the
    GIL, which no pytest timeout can interrupt: faulthandler's watchdog, a C
    thread, dumps the stacks and ends the run instead.)"""
    if provider != "shm":
        pytest.skip("a shm provider hazard (the peer's region lock)")
    writer = await make_engine(provider, peer_timeout=1.0)
    proc, conn = children.start(peers.locked_target_main)
    faulthandler.dump_traceback_later(90, exit=True)
    try:
        address, descs = await expect(conn, "ready")
        smr = writer.register(np.arange(4096, dtype=np.uint8))
        await writer.write(smr, descs[0], imm=1)   # connected, both endpoints mapped
        await writer.write(smr, descs[0], imm=1)
        conn.send(("lock",))
        (locked,) = await expect(conn, "locked")
        assert len(locked) == 2, locked      # the two endpoints of the default
        proc.kill()
        await join(proc)
        futs = [writer.write(smr, descs[0], imm=2) for _ in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    finally:
        faulthandler.cancel_dump_traceback_later()
        remove_shm_leftovers(proc.pid)
    assert all(isinstance(r, TransferError) for r in results), results
    assert "peer" in str(results[0]).lower(), results[0]
    assert sum(s["locks_released"] for s in writer.stats()) >= 1, writer.stats()


@pytest.mark.timeout(120, method="thread")
async def test_shm_writer_dead_holding_our_region_lock(make_engine, children, provider, rng,
                                                       seed):
    """A shm writer holds the target's region lock while it posts, and over
    the copy lane for the whole copy of a write; killed then, the lock stays
    taken and the target's next poll would spin in fi_cq_read for ever (its
    event loop with it: seen in about one random writer kill in ten at
    1 MiB).  The child takes our two region locks and SIGKILLs itself: within
    seconds the shm watch must release them, our engine must go on polling
    (a wait for an immediate that never comes ends in TimeoutError) and take
    new writes, every byte checked."""
    if provider != "shm":
        pytest.skip("a shm provider hazard (our region's lock)")
    target = await make_engine(provider)
    dst = np.zeros(2 * MiB, np.uint8)
    dmr = target.register(dst)
    names = [target._core.getname(i).rstrip(b"\0").decode().removeprefix("fi_shm://")
             for i in range(target._core.nic_count())]
    proc, conn = children.start(peers.locking_writer_main)
    faulthandler.dump_traceback_later(90, exit=True)
    try:
        conn.send(("target", dmr.descriptor))
        await expect(conn, "writing")
        await target.expect_imm(1, 8, timeout=30)
        conn.send(("lock", names))
        (locked,) = await expect(conn, "locked")
        assert sorted(locked) == sorted(names), locked
        assert await join(proc) == -9
        with pytest.raises(TimeoutError):
            await target.expect_imm(9, 1, timeout=4)   # the loop polls meanwhile
        released = sum(s["locks_released"] for s in target.stats())
        assert released >= 1, target.stats()
        sender = await make_engine(provider)
        src = random_bytes(rng, 2 * MiB)
        await asyncio.wait_for(sender.write(sender.register(src), dmr.descriptor, imm=10), 30)
        await target.expect_imm(10, 1, timeout=30)
    finally:
        faulthandler.cancel_dump_traceback_later()
        remove_shm_leftovers(proc.pid)
    assert_bytes(dst, src, f"seed={seed}: target after its writer died holding its lock")


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
async def test_cross_process_writer_killed_at_random_moments(make_engine, children, provider,
                                                             rng, seed):
    """Soak of the kill above, the other way round: a writer streams windows
    of 64 writes of 1 MiB into our region (on shm half of them over the copy
    lane, each holding our region's lock for its whole copy) and is SIGKILLed
    at a random moment, ten times on shm, three elsewhere.  Each time our
    engine must go on polling (a wait for an immediate that never comes ends
    in TimeoutError) and take a new writer's write, every byte checked."""
    size = min(MAX_TRANSFER[provider], 1 * MiB)
    released = 0
    for trial in range(10 if provider == "shm" else 3):
        faulthandler.dump_traceback_later(120, exit=True)   # a spin holds the GIL
        target = await make_engine(provider)
        dst = np.zeros(64 * size, np.uint8)
        dmr = target.register(dst)
        proc, conn = children.start(peers.streaming_writer_main, provider, size)
        try:
            conn.send(("target", dmr.descriptor))
            await expect(conn, "writing")
            await asyncio.sleep(float(rng.uniform(0, 0.3)))
            proc.kill()
            assert await join(proc) == -9
            with pytest.raises(TimeoutError):
                await target.expect_imm(9, 1, timeout=3)   # the loop polls meanwhile
            sender = await make_engine(provider)
            src = random_bytes(rng, size)
            await asyncio.wait_for(sender.write(sender.register(src), dmr.descriptor, imm=10), 30)
            await target.expect_imm(10, 1, timeout=30)
            assert_bytes(dst[:size], src, f"seed={seed} trial {trial}: after the writer died")
            released += sum(s["locks_released"] for s in target.stats())
            await asyncio.wait_for(sender.close(), 30)
            await asyncio.wait_for(target.close(), 30)
        finally:
            faulthandler.cancel_dump_traceback_later()
            if provider == "shm":
                remove_shm_leftovers(proc.pid)
    print(f"{provider}: our locks released after a writer died: {released}")


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
async def test_cross_process_target_killed_at_random_moments(make_engine, children, provider,
                                                             rng):
    """Soak of the kill above: five times, a burst of 5,000 writes of 64 KiB
    (more than the provider queues take, so the engine still holds some when
    the target dies) and the target SIGKILLed at a random moment of it.  Every
    write ends, completed or with a TransferError, within the peer timeout
    plus a margin: nothing spins on a lock the dead process held (shm's
    region lock) and nothing stays pending."""
    size, slots = 64 * KiB, 64
    released = 0
    for trial in range(5):
        faulthandler.dump_traceback_later(120, exit=True)   # see the test above
        writer = await make_engine(provider, peer_timeout=2.0)
        plan = {"regions": [size * slots], "fill_seed": 1, "src_seed": 2, "src_size": 1,
                "placements": [], "imms": {}, "messages": [], "parent_address": writer.address}
        proc, conn = children.start(peers.receiver_main, provider, plan)
        try:
            address, descs = await expect(conn, "ready")
            smr = writer.register(random_bytes(rng, size * slots))
            await writer.write(smr, descs[0], length=size)
            futs = [writer.write(smr, descs[0], length=size, src_offset=(i % slots) * size,
                                 dst_offset=(i % slots) * size, imm=5) for i in range(5000)]
            await asyncio.sleep(float(rng.uniform(0, 0.05)))
            proc.kill()
            await join(proc)
        finally:
            if provider == "shm":
                remove_shm_leftovers(proc.pid)
        done, pending = await asyncio.wait(futs, timeout=60)
        faulthandler.cancel_dump_traceback_later()
        assert not pending, (f"trial {trial}: {len(pending)} of {len(futs)} writes still "
                             f"pending 60 s after the kill; stats {writer.stats()}")
        bad = {type(f.exception()).__name__ for f in futs
               if f.exception() is not None and not isinstance(f.exception(), TransferError)}
        assert not bad, f"trial {trial}: {bad}"
        released += sum(s["locks_released"] for s in writer.stats())
        await asyncio.wait_for(writer.close(), 30)
    print(f"{provider}: dead holders' locks released in 5 trials: {released}")
