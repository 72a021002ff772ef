"""Failures across testbed hosts (aiotransfer.testbed): a link cut in the
middle of a transfer (failover to the other NIC, every byte right, every
immediate counted exactly once, the healed link used again), and a peer
process killed in the middle of a transfer (bounded failure, the engine
keeps serving its other peers, a restarted peer is reachable)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import aiotransfer
from aiotransfer import PeerError, TransferError, testbed

import peers
from support import KiB, MiB
from test_multiprocess import expect, join

pytestmark = pytest.mark.timeout(300)

PROVIDER = "tcp;ofi_rxm"
RATE = 200          # Mbit/s per link: a round of the plan below takes about a second


@pytest.fixture(scope="module")
def fabric():
    """Three hosts with two NICs each, links shaped to RATE."""
    ok, why = testbed.available()
    if not ok:
        pytest.skip(f"multi-host testbed unavailable here: {why}")
    with testbed.Testbed(hosts=3, nics=2, rate_mbit=RATE) as tb:
        yield tb


NICS = ["nic0", "nic1"]


def _plan(rng) -> peers.PlanBuilder:
    """About 40 MiB in immediate-carrying pieces: a link cut catches many
    immediates in flight."""
    pb = peers.PlanBuilder(rng, PROVIDER, 1, regions=[48 * MiB, 8 * MiB], src_size=8 * MiB)
    pb.plans[0]["report_stats"] = True
    for i in range(4):
        assert pb.write(0, 0, 3 * MiB + int(rng.integers(1, 4096)), imm=100 + i)  # striped
    for i in range(6):
        assert pb.paged(0, 0, 256, 16 * KiB, imm=200 + i, as_list=False)          # 4 MiB each
    for i in range(200):
        pb.write(0, 1, int(rng.integers(1, 32 * KiB)), imm=300 + i % 7)
    for _ in range(20):
        pb.write_imm(0, 1, 400)
    return pb


async def test_link_cut_fails_over_and_heals(fabric, children, rng, seed):
    """The receiver's second link is cut while about 40 MiB of writes with
    immediates are in flight: the lane is declared down, its work requests
    go again over the first link, and every byte lands with every immediate
    counted once, also after the link heals and the stale copies that were
    stuck in it arrive.  Afterwards the healed link carries traffic again."""
    pb = _plan(rng)
    rproc, rconn = children.start(peers.receiver_main, PROVIDER, pb.plans[0],
                                  {"netns": fabric.hosts[1].name, "nics": NICS})
    _, descs = await expect(rconn, "ready")
    sproc, sconn = children.start(peers.sender_main, PROVIDER,
                                  {"netns": fabric.hosts[0].name, "nics": NICS},
                                  pb.ops, pb.src_seed, pb.src_size)
    await expect(sconn, "ready")
    sconn.send(("targets", [descs], [None]))
    await expect(sconn, "posted")
    await asyncio.sleep(0.3)
    fabric.cut(1, 1)
    try:
        (stats,) = await expect(sconn, "sent", timeout=120)
    finally:
        fabric.heal(1, 1)
    assert stats[1]["lanes_down"] >= 1, f"seed={seed}: no failover happened: {stats}"
    assert sum(s["wrs_resent"] for s in stats) >= 1, stats
    # let what was stuck in the cut link arrive (TCP retransmits after the heal)
    await asyncio.sleep(4)
    rconn.send(("done", None))
    errors, rstats = await expect(rconn, "result")
    assert errors == [], f"seed={seed}: the receiver found:\n" + "\n".join(errors)
    # the healed link is used again
    sconn.send(("again",))
    await expect(sconn, "posted")
    (stats2,) = await expect(sconn, "sent", timeout=120)
    assert stats2[1]["bytes_written"] > stats[1]["bytes_written"], \
        f"seed={seed}: the healed NIC carried nothing more: {stats} -> {stats2}"
    for proc, conn in ((rproc, rconn), (sproc, sconn)):
        conn.send(("bye",))
    for proc in (rproc, sproc):
        assert await join(proc) == 0


def _target_main(conn, ns: str) -> None:
    """Child: an engine with one region on a testbed host; runs until killed
    or told "bye"."""
    testbed.enter(ns)

    async def run() -> None:
        async with aiotransfer.TransferEngine(PROVIDER, nics=NICS) as eng:
            buf = np.zeros(16 * MiB, np.uint8)
            mr = eng.register(buf)
            conn.send((eng.address, mr.descriptor))
            await asyncio.to_thread(conn.recv)
            conn.send(int(buf.sum()))
            await asyncio.to_thread(conn.recv)

    asyncio.run(run())


def _killer_main(conn, ns: str, timeout: float) -> None:
    """Child: writes to a target that the parent kills, to another that
    stays, then to a restarted target; reports what happened."""
    testbed.enter(ns)

    async def run() -> None:
        async with aiotransfer.TransferEngine(PROVIDER, nics=NICS, peer_timeout=timeout) as eng:
            src = np.ones(1 * MiB, np.uint8)
            mr = eng.register(src)
            doomed, alive = await asyncio.to_thread(conn.recv)
            await eng.write(mr, doomed)
            futs = [eng.write(mr, doomed, dst_offset=(i % 16) * MiB, imm=1) for i in range(400)]
            conn.send("writing")
            await asyncio.to_thread(conn.recv)          # the parent killed the doomed target
            t0 = time.monotonic()
            keep = [eng.write(mr, alive, dst_offset=(i % 16) * MiB, imm=2) for i in range(40)]
            res = await asyncio.gather(*futs, return_exceptions=True)
            t_fail = time.monotonic() - t0
            kinds = sorted({type(r).__name__ for r in res})
            peer_named = all(r is None or (isinstance(r, TransferError) and r.peer) for r in res)
            await asyncio.gather(*keep)
            conn.send({"t_fail": t_fail, "kinds": kinds, "failed": sum(r is not None for r in res),
                       "peer_named": peer_named,
                       "peer_errors": sum(isinstance(r, PeerError) for r in res)})
            restarted = await asyncio.to_thread(conn.recv)
            await eng.write(mr, restarted, imm=3)
            conn.send("restarted ok")
            await asyncio.to_thread(conn.recv)

    asyncio.run(run())


async def test_peer_killed_mid_transfer(fabric, children):
    """A target process is SIGKILLed with 400 writes in flight to it: every
    one ends within peer_timeout (plus slack), as a TransferError naming the
    peer; writes to another target keep flowing; a new target process (a new
    address) is reachable from the same engine."""
    timeout = 2.0
    doomed, dconn = children.start(_target_main, fabric.hosts[1].name)
    alive, aconn = children.start(_target_main, fabric.hosts[2].name)
    _, ddesc = await expect_plain(dconn)
    _, adesc = await expect_plain(aconn)
    writer, wconn = children.start(_killer_main, fabric.hosts[0].name, timeout)
    wconn.send((ddesc, adesc))
    assert await expect_plain(wconn) == "writing"
    await asyncio.sleep(0.2)
    doomed.kill()
    await join(doomed)
    wconn.send("killed")
    report = await expect_plain(wconn, 60)
    assert report["failed"] > 0, report
    assert report["peer_named"], report
    assert report["t_fail"] < timeout + 3.0, report
    assert set(report["kinds"]) <= {"NoneType", "PeerError", "TransferError"}, report
    # the other target got its 40 writes
    aconn.send("check")
    assert await expect_plain(aconn) == 16 * MiB   # 40 writes of ones over its 16 slots
    # a restarted target, at a new address
    again, gconn = children.start(_target_main, fabric.hosts[1].name)
    _, gdesc = await expect_plain(gconn)
    wconn.send(gdesc)
    assert await expect_plain(wconn, 60) == "restarted ok"
    gconn.send("check")
    assert await expect_plain(gconn) == 1 * MiB
    for conn in (wconn, aconn, gconn):
        conn.send("bye")
    for proc in (writer, alive, again):
        assert await join(proc) == 0


async def expect_plain(conn, timeout: float = peers.STEP_TIMEOUT):
    """The next object a plain child sends (EOFError: it died)."""
    try:
        return await peers.pipe_recv(conn, timeout)
    except EOFError:
        raise AssertionError("the child went away") from None


def _lo_target_main(conn) -> None:
    """Child: an engine on loopback with a 64 MiB region; the parent stops
    (SIGSTOP) and resumes it."""
    async def run() -> None:
        async with aiotransfer.TransferEngine(PROVIDER, nics=["lo"]) as eng:
            mr = eng.register(np.zeros(64 * MiB, np.uint8))
            conn.send(mr.descriptor)
            await asyncio.to_thread(conn.recv)

    asyncio.run(run())


async def test_stalled_peer_times_out_and_region_stays_pinned(make_engine, children):
    """A peer that stops answering (SIGSTOP) with 128 MiB of writes in
    flight: they fail with PeerError after peer_timeout, but the source
    region cannot be deregistered while the provider still holds its work
    requests; once the peer resumes they drain and it can."""
    import os
    import signal
    eng = await make_engine(PROVIDER, peer_timeout=1.0)
    proc, conn = children.start(_lo_target_main)
    desc = await expect_plain(conn)
    src = eng.register(np.ones(4 * MiB, np.uint8))
    await eng.write(src, desc)                       # connected
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        futs = [eng.write(src, desc, dst_offset=(i % 16) * 4 * MiB, imm=1) for i in range(32)]
        res = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        elapsed = time.monotonic() - t0
        assert any(isinstance(r, PeerError) for r in res), res
        assert all(r is None or isinstance(r, PeerError) for r in res), res
        assert elapsed < 1.0 + 3.0, elapsed
        assert "no completion from the peer" in str(next(r for r in res if r is not None))
        assert src.inflight == 0
        with pytest.raises(BufferError, match="NIC"):
            eng.deregister(src)                      # the provider still holds them
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while True:
        try:
            eng.deregister(src)
            break
        except BufferError:
            assert time.monotonic() < deadline, "work requests never drained"
            await asyncio.sleep(0.05)
    assert src.closed
    conn.send("bye")
    assert await join(proc) == 0
