"""Code that runs in spawned child processes (multiprocessing "spawn").

Everything here is importable by a fresh interpreter: the children get the
parent's sys.path, which holds this directory.  Every blocking step of a
child has a timeout, so a child never outlives a failed parent for long; the
parent still joins or kills every child in a ``finally``.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np

import aiotransfer
from aiotransfer import EngineClosedError, ScatterTarget, TransferError

from support import MAX_TRANSFER, KiB, MiB, assert_bytes, nics_for, random_bytes

STEP_TIMEOUT = 90.0
ECHO_IMM = 0xEC40


# ------------------------------------------------------------------- pipes

def _child_setup() -> None:
    """Run children in the temp dir: crash reports land there, not in the project."""
    os.chdir(tempfile.gettempdir())


def _run_child(conn, main: Callable[[], Any]) -> Any:
    """In a child: set up, then asyncio.run(main()) and return its result;
    anything raised is reported to the parent on conn, then re-raised (the
    child exits non-zero)."""
    _child_setup()
    try:
        return asyncio.run(main())
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


async def pipe_recv(conn, timeout: float = STEP_TIMEOUT) -> Any:
    """Receive one object from a multiprocessing connection without blocking the loop."""
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError(f"nothing on the pipe for {timeout} s")
    return conn.recv()


# ------------------------------------------------------------ the receiver

def expected_regions(plan: dict) -> list[np.ndarray]:
    """The receiver's regions as they must look once every placement landed."""
    regions = [random_bytes(np.random.default_rng(plan["fill_seed"] + i), n)
               for i, n in enumerate(plan["regions"])]
    src = random_bytes(np.random.default_rng(plan["src_seed"]), plan["src_size"])
    for r, do, so, n in plan["placements"]:
        regions[r][do:do + n] = src[so:so + n]
    return regions


def _enter(where: dict | None) -> Any:
    """Move this child into a testbed host (``where["netns"]``); returns the
    ``nics=`` its engine uses (``where["nics"]``, else the provider default)."""
    if where and where.get("netns"):
        from aiotransfer import testbed
        testbed.enter(where["netns"])
    return (where or {}).get("nics")


def receiver_main(conn, provider: str, plan: dict, where: dict | None = None) -> None:
    """Child: own engine + regions; verify every byte, immediate and message.
    ``where``: {"netns": testbed host, "nics": [...]} to run on a testbed host."""
    _run_child(conn, lambda: _receiver(conn, provider, plan, _enter(where)))


async def _receiver(conn, provider: str, plan: dict, nics: Any = None) -> None:
    async with aiotransfer.TransferEngine(provider=provider,
                                          nics=nics or nics_for(provider)) as engine:
        bufs = [random_bytes(np.random.default_rng(plan["fill_seed"] + i), n)
                for i, n in enumerate(plan["regions"])]
        mrs = [engine.register(b) for b in bufs]
        expected = expected_regions(plan)
        conn.send(("ready", engine.address, [m.descriptor for m in mrs]))
        kind, *rest = await pipe_recv(conn)
        assert kind == "done", kind
        (echo_to,) = rest
        errors: list[str] = []
        for imm, count in plan["imms"].items():
            try:
                # the parent says "done" once all its writes completed: the
                # immediates are (nearly) all here already
                await engine.expect_imm(imm, count, timeout=30)
            except TimeoutError:
                c = engine.imm_counter(imm)
                errors.append(f"imm {imm}: expected {count}, got {c.total} (timed out)")
        for i, (buf, exp) in enumerate(zip(bufs, expected)):
            try:
                assert_bytes(buf, exp, f"region {i} ({buf.size} B)")
            except AssertionError as exc:
                errors.append(str(exc))
        got = []
        for _ in plan["messages"]:
            try:
                got.append(await engine.recv(timeout=STEP_TIMEOUT))
            except TimeoutError:
                break
        if collections.Counter(got) != collections.Counter(plan["messages"]):
            errors.append(f"messages: got {len(got)} {sorted(map(len, got))[:10]}..., expected "
                          f"{len(plan['messages'])} {sorted(map(len, plan['messages']))[:10]}...")
        await asyncio.sleep(0.1)  # anything extra would show up now
        for imm, count in plan["imms"].items():
            c = engine.imm_counter(imm)
            if (c.value, c.total) != (0, count):
                errors.append(f"imm {imm}: value {c.value} total {c.total}, expected 0/{count}")
        total = sum(s["imms_received"] for s in engine.stats())
        if total != sum(plan["imms"].values()):
            errors.append(f"{total} immediates received, expected {sum(plan['imms'].values())}")
        if echo_to is not None and not errors:
            # the other direction: write region 0 back, then say so in a message
            await engine.write(mrs[0], echo_to, imm=ECHO_IMM)
            await engine.send(plan["parent_address"], b"echo-done")
        if plan.get("report_stats"):
            conn.send(("result", errors, engine.stats()))
        else:
            conn.send(("result", errors))
        kind, *_ = await pipe_recv(conn)
        assert kind == "bye", kind


# ------------------------------------------------------- plan generation

class PlanBuilder:
    """Builds the sender's operations and each receiver's expectations."""

    def __init__(self, rng: np.random.Generator, provider: str, n_receivers: int,
                 regions: list[int], src_size: int) -> None:
        self.rng = rng
        self.provider = provider
        self.src_size = src_size
        self.src_seed = int(rng.integers(0, 2 ** 31))
        self.src = random_bytes(np.random.default_rng(self.src_seed), src_size)
        self.ops: list[tuple] = []
        self.plans = []
        self.cursor = []
        for _ in range(n_receivers):
            self.plans.append({"regions": list(regions), "fill_seed": int(rng.integers(0, 2 ** 31)),
                               "src_seed": self.src_seed, "src_size": src_size, "placements": [],
                               "imms": {}, "messages": [], "parent_address": None})
            self.cursor.append([0] * len(regions))

    def _slot(self, rcv: int, region: int, n: int) -> int | None:
        """A fresh destination range of n bytes (with a random gap), or None if full."""
        gap = int(self.rng.integers(0, 64))
        do = self.cursor[rcv][region] + gap
        if do + n > self.plans[rcv]["regions"][region]:
            return None
        self.cursor[rcv][region] = do + n
        return do

    def _imm(self, rcv: int, imm: int | None, count: int = 1) -> None:
        if imm is not None and count:
            d = self.plans[rcv]["imms"]
            d[imm] = d.get(imm, 0) + count

    def write(self, rcv: int, region: int, n: int, imm: int | None) -> bool:
        do = self._slot(rcv, region, n)
        if do is None:
            return False
        so = int(self.rng.integers(0, self.src_size - n + 1))
        self.plans[rcv]["placements"].append((region, do, so, n))
        self._imm(rcv, imm)
        self.ops.append(("write", rcv, region, so, do, n, imm))
        return True

    def paged(self, rcv: int, region: int, npages: int, page_size: int, imm: int | None,
              as_list: bool) -> bool:
        ds = page_size + int(self.rng.integers(0, 16))
        span = npages * ds
        base = self._slot(rcv, region, span)
        if base is None:
            return False
        ss = page_size + int(self.rng.integers(0, 16))
        src_pages_max = (self.src_size - page_size) // ss
        sp = self.rng.integers(0, src_pages_max + 1, npages)
        dp = self.rng.permutation(npages)
        for s, d in zip(sp, dp):
            self.plans[rcv]["placements"].append(
                (region, base + int(d) * ds, int(s) * ss, page_size))
        self._imm(rcv, imm, npages)
        if as_list:
            sp, dp = [int(x) for x in sp], [int(x) for x in dp]
        else:
            sp, dp = sp.astype(np.int64), dp.astype(np.int32)
        self.ops.append(("paged", rcv, region, sp, dp, page_size, ss, ds, base, imm))
        return True

    def scatter(self, parts: list[tuple[int, int, int]], imm: int | None) -> None:
        """parts: (receiver, region, length)"""
        targets = []
        for rcv, region, n in parts:
            do = self._slot(rcv, region, n)
            if do is None:
                continue
            so = int(self.rng.integers(0, self.src_size - n + 1))
            self.plans[rcv]["placements"].append((region, do, so, n))
            self._imm(rcv, imm)
            targets.append((rcv, region, n, so, do))
        self.ops.append(("scatter", targets, imm))

    def write_imm(self, rcv: int, region: int, imm: int) -> None:
        self._imm(rcv, imm)
        self.ops.append(("write_imm", rcv, region, imm))

    def barrier(self, dsts: list[tuple[int, int]], imm: int) -> None:
        for rcv, _ in dsts:
            self._imm(rcv, imm)
        self.ops.append(("barrier", dsts, imm))

    def message(self, rcv: int, data: bytes) -> None:
        self.plans[rcv]["messages"].append(data)
        self.ops.append(("send", rcv, data))


async def run_ops(engine, smr, ops: list[tuple], descs: list[list[bytes]],
                  addresses: list[bytes]) -> None:
    """Post every planned operation at once and wait for all of them."""
    await wait_ops(post_ops(engine, smr, ops, descs, addresses))


async def wait_ops(futs: list) -> None:
    results = await asyncio.wait_for(asyncio.gather(*futs), STEP_TIMEOUT)
    assert results == [None] * len(futs)


def post_ops(engine, smr, ops: list[tuple], descs: list[list[bytes]],
             addresses: list[bytes]) -> list:
    """Post every planned operation; returns their futures."""
    futs = []
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, rcv, region, so, do, n, imm = op
            futs.append(engine.write(smr, descs[rcv][region], length=n, src_offset=so,
                                     dst_offset=do, imm=imm))
        elif kind == "paged":
            _, rcv, region, sp, dp, ps, ss, ds, base, imm = op
            futs.append(engine.write_paged(smr, sp, descs[rcv][region], dp, page_size=ps,
                                           src_stride=ss, dst_stride=ds, dst_offset=base,
                                           imm=imm))
        elif kind == "scatter":
            _, targets, imm = op
            futs.append(engine.scatter(smr, [ScatterTarget(descs[r][g], n, so, do)
                                              for r, g, n, so, do in targets], imm=imm))
        elif kind == "write_imm":
            _, rcv, region, imm = op
            futs.append(engine.write_imm(descs[rcv][region], imm))
        elif kind == "barrier":
            _, dsts, imm = op
            futs.append(engine.barrier([descs[r][g] for r, g in dsts], imm))
        elif kind == "send":
            _, rcv, data = op
            futs.append(engine.send(addresses[rcv], data))
    return futs


# ------------------------------------------------------ sender children

def sender_main(conn, provider: str, where: dict, ops: list[tuple], src_seed: int,
                src_size: int) -> None:
    """Child: on a testbed host, run a PlanBuilder's operations against the
    receivers' descriptors; report per-NIC stats."""
    _run_child(conn, lambda: _sender(conn, provider, _enter(where), ops, src_seed, src_size))


async def _sender(conn, provider: str, nics: Any, ops: list[tuple], src_seed: int,
                  src_size: int) -> None:
    async with aiotransfer.TransferEngine(provider=provider, nics=nics) as engine:
        smr = engine.register(random_bytes(np.random.default_rng(src_seed), src_size))
        conn.send(("ready", engine.address, [n.name for n in engine.nics]))
        kind, descs, addresses = await pipe_recv(conn)
        assert kind == "targets", kind
        while True:
            futs = post_ops(engine, smr, ops, descs, addresses)
            conn.send(("posted",))
            await wait_ops(futs)
            conn.send(("sent", engine.stats()))
            kind, *_ = await pipe_recv(conn)
            if kind != "again":
                break
        assert kind == "bye", kind


# ------------------------------------------------------ writer children

def writer_main(conn, provider: str, how: str, seed: int) -> None:
    """Child: writes to the parent's region until told (or killed) mid-flight.

    how="close": close the engine with writes in flight, report, exit.
    how="kill": keep writing until SIGKILLed by the parent."""
    _run_child(conn, lambda: _writer(conn, provider, how, seed))


async def _writer(conn, provider: str, how: str, seed: int) -> None:
    # a tiny queue keeps most of the 2000 writes queued when we close
    engine = aiotransfer.TransferEngine(provider=provider, nics=nics_for(provider),
                                        tx_depth=2 if how == "close" else None)
    await engine.start()
    try:
        n = min(MAX_TRANSFER[provider], 2 * MiB)
        smr = engine.register(random_bytes(np.random.default_rng(seed), n))
        kind, desc = await pipe_recv(conn)
        assert kind == "target", kind
        await engine.write(smr, desc, imm=1)  # connected, one complete write
        futs = [engine.write(smr, desc, imm=2) for _ in range(2000)]
        conn.send(("writing", None))
        if how == "kill":
            await asyncio.sleep(STEP_TIMEOUT)  # the parent kills us meanwhile
            return
        await asyncio.sleep(0)   # let the loop run once: some are posted, most queued
        await engine.close()
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        bad = [r for r in results if not (r is None or isinstance(r, EngineClosedError))]
        closed = sum(isinstance(r, EngineClosedError) for r in results)
        conn.send(("closed", {"bad": [repr(r) for r in bad[:3]], "closed": closed}))
    finally:
        await engine.close()


# ------------------------------------------------- a shm target dying locked

#: libfabric 1.17's shm region head (include/ofi_shm.h, SMR_VERSION 4): the
#: version byte at 0, the owner's pid at 4, the pthread spin lock at 24
SMR117_VERSION, SMR117_PID_OFFSET, SMR117_LOCK_OFFSET = 4, 4, 24


def _take_region_lock(name: str, owner: int, signal_owner: bool = False):
    """Map /dev/shm/<name>, check it is a libfabric 1.17 shm region head of
    process `owner`, take its spin lock as the provider does (glibc: on
    x86-64 a free lock is 1) and, with signal_owner, set its signal word as
    a post does (the owner's next poll then takes the lock).  Returns the
    mapping, which must stay open while the lock is meant to be held."""
    import ctypes
    import mmap
    import struct

    libc = ctypes.CDLL(None)
    with open(os.path.join("/dev/shm", name), "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096)
    version = m[0]
    (pid,) = struct.unpack_from("i", m, SMR117_PID_OFFSET)
    assert (version, pid) == (SMR117_VERSION, owner), \
        f"{name}: not a libfabric 1.17 shm region head of {owner} ({version}, {pid})"
    addr = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(m)) + SMR117_LOCK_OFFSET)
    while libc.pthread_spin_trylock(addr) != 0:
        time.sleep(0.001)   # (its owner may be inside a poll)
    assert libc.pthread_spin_trylock(addr) != 0, f"{name}: not locked"
    if signal_owner:
        struct.pack_into("i", m, SMR117_LOCK_OFFSET + 4, 1)
    return m


def streaming_writer_main(conn, provider: str, size: int) -> None:
    """Child: streams windows of 64 writes of `size` bytes (immediate 1) into
    the parent's region until SIGKILLed."""
    _run_child(conn, lambda: _streaming_writer(conn, provider, size))


async def _streaming_writer(conn, provider: str, size: int) -> None:
    async with aiotransfer.TransferEngine(provider=provider, nics=nics_for(provider)) as engine:
        kind, desc = await pipe_recv(conn)
        assert kind == "target", kind
        mr = engine.register(random_bytes(np.random.default_rng(1), 64 * size))
        window = [engine.write(mr, desc, length=size, src_offset=i * size, dst_offset=i * size,
                               imm=1) for i in range(64)]
        await asyncio.gather(*window)
        conn.send(("writing",))
        while True:
            await asyncio.gather(*[engine.write(mr, desc, length=size, src_offset=i * size,
                                                dst_offset=i * size, imm=1)
                                   for i in range(64)])


def locked_target_main(conn) -> None:
    """Child: a shm engine with one region; on "lock" it takes the spin locks
    of its own endpoints' shm regions, as its progress does while it copies,
    reports how many, and waits to be SIGKILLed holding them."""
    _run_child(conn, lambda: _locked_target(conn))


async def _locked_target(conn) -> None:
    async with aiotransfer.TransferEngine(provider="shm") as engine:
        buf = np.zeros(MiB, np.uint8)
        mr = engine.register(buf)
        conn.send(("ready", engine.address, [mr.descriptor]))
        kind, *_ = await pipe_recv(conn)
        assert kind == "lock", kind
        names = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{os.getpid()}:"))
        maps = [_take_region_lock(name, os.getpid()) for name in names]
        conn.send(("locked", names))
        await asyncio.sleep(STEP_TIMEOUT)   # the parent kills us meanwhile
        del maps


def locking_writer_main(conn) -> None:
    """Child: a shm engine that writes into the parent's region (both sides
    then map each other's regions); on ("lock", names) it takes the spin
    locks of those regions of the parent, as a copy-lane post does while it
    copies, reports them and SIGKILLs itself holding them (the parent's
    event loop may already spin on them, unable to kill us)."""
    _run_child(conn, lambda: _locking_writer(conn))


async def _locking_writer(conn) -> None:
    async with aiotransfer.TransferEngine(provider="shm") as engine:
        kind, desc = await pipe_recv(conn)
        assert kind == "target", kind
        src = np.arange(64 * KiB, dtype=np.uint8)
        mr = engine.register(src)
        await asyncio.gather(*[engine.write(mr, desc, imm=1) for _ in range(8)])
        conn.send(("writing",))
        kind, names = await pipe_recv(conn)
        assert kind == "lock", kind
        maps = [_take_region_lock(name, os.getppid(), signal_owner=True) for name in names]
        conn.send(("locked", names))
        os.kill(os.getpid(), signal.SIGKILL)   # holding them (maps still open)
        del maps


# ------------------------------------------------------ isolated scenarios

def isolated_main(conn, name: str, args: tuple) -> None:
    """Child: run one scenario of this module (so that a crash inside
    libfabric fails one test instead of killing the whole test run)."""
    conn.send(("ok", _run_child(conn, lambda: SCENARIOS[name](*args))))


class EngineFactory:
    """A plain stand-in of the make_engine fixture for child processes."""

    def __init__(self) -> None:
        self.engines: list[aiotransfer.TransferEngine] = []

    async def __call__(self, provider: str, **kwargs) -> aiotransfer.TransferEngine:
        kwargs.setdefault("nics", nics_for(provider))
        e = aiotransfer.TransferEngine(provider=provider, **kwargs)
        self.engines.append(e)
        return await e.start()

    async def close(self) -> None:
        for e in self.engines:
            await e.close()


async def close_sender_in_flight(make_engine, provider: str, seed: int,
                                 tx_depth: int | None = None, rounds: int = 3) -> dict:
    """Close the sender while writes of every kind are in flight (``rounds``
    times, a fresh sender each time): each future ends (None or
    EngineClosedError), nothing hangs, the target keeps working for a new
    sender.

    With the default queue depth a fast provider may have finished everything
    by the time close() runs (shm copies at post time); with a tiny tx_depth
    most operations are still queued, so some must end with EngineClosedError."""
    rng = np.random.default_rng(seed)
    b = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 4 * MiB)
    dst = np.zeros(n, np.uint8)
    dmr = b.register(dst)
    d = dmr.descriptor
    outcome: collections.Counter = collections.Counter()
    for round_ in range(rounds):
        a = await make_engine(provider, **({} if tx_depth is None else {"tx_depth": tx_depth}))
        smr = a.register(random_bytes(rng, n))
        futs = []
        for i in range(40):
            futs.append(a.write(smr, d, imm=1))
            futs.append(a.write_paged(smr, [0, 1, 2], d, [2, 1, 0], page_size=n // 4, imm=2))
            futs.append(a.scatter(smr, [ScatterTarget(d, n // 2),
                                        ScatterTarget(d, n // 2, n // 2)]))
            futs.append(a.barrier([d, d], 3))
            futs.append(a.write_imm(d, 4))
            futs.append(a.send(b.address, b"m%d" % i))
        waiter = asyncio.create_task(a.expect_imm(5, 1))
        receiver = asyncio.create_task(a.recv())
        await asyncio.sleep(0)
        await asyncio.wait_for(a.close(), 30)
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        got = collections.Counter("ok" if r is None else type(r).__name__ for r in results)
        outcome += got
        assert all(r is None or isinstance(r, EngineClosedError) for r in results), \
            f"seed={seed} round {round_}: {dict(got)}"
        if tx_depth is not None:
            assert any(isinstance(r, EngineClosedError) for r in results), \
                f"seed={seed} round {round_}: nothing was in flight at close? {dict(got)}"
        for task in (waiter, receiver):
            try:
                await asyncio.wait_for(task, 5)
            except EngineClosedError:
                pass
            else:
                raise AssertionError("a waiter survived close()")
        assert smr.closed and smr.inflight == 0
    # the target still works, with a fresh sender
    await asyncio.sleep(0.2)
    c = await make_engine(provider)
    src2 = random_bytes(rng, n)
    s2 = c.register(src2)
    base = b.imm_counter(9).total
    await c.write(s2, d, imm=9)
    await b.expect_imm(9, base + 1, timeout=30)
    assert_bytes(dst, src2, f"seed={seed}: target after its senders were closed mid-flight")
    await c.send(b.address, b"still alive")
    while (m := await b.recv(timeout=30)) != b"still alive":
        assert m.startswith(b"m"), m
    return dict(outcome)


async def close_target_mid_stream(make_engine, provider: str, seed: int,
                                  rounds: int = 4) -> dict:
    """Close the *target* while a stream of large writes with immediates
    arrives, at a random moment of it (``rounds`` times, fresh engines):
    its close returns, every write of the writer ends (None or
    TransferError, at the latest when the writer closes), a write that
    succeeded left its whole slot, and no byte of any slot is other than
    the source's or untouched.

    libfabric 1.17's tcp;ofi_rxm crashed here (a NULL context in
    rxm_handle_comp_error) whenever the target's endpoint closed with a
    write half received: almost every round at 4 MiB, before the engine
    shut its sockets for reading first (csrc/atx.c, shutdown_worker)."""
    rng = np.random.default_rng(seed)
    size = min(MAX_TRANSFER[provider], 4 * MiB)
    window = 8
    outcome: collections.Counter = collections.Counter()
    for round_ in range(rounds):
        a = await make_engine(provider)
        b = await make_engine(provider)
        src = rng.integers(1, 256, size, dtype=np.uint8)   # no zero byte: "untouched" is 0
        smr = a.register(src)
        dst = np.zeros(window * size, np.uint8)
        d = b.register(dst).descriptor
        futs: list = []
        stop = False

        async def stream() -> None:
            while not stop:
                batch = [a.write(smr, d, dst_offset=i * size, imm=1) for i in range(window)]
                futs.extend(batch)
                await asyncio.wait(batch)

        streamer = asyncio.create_task(stream())
        await b.expect_imm(1, 1, timeout=30)   # the stream flows
        await asyncio.sleep(float(rng.uniform(0, 0.02)))
        await asyncio.wait_for(b.close(), 30)
        stop = True
        # (a write caught in the teardown of its connection may end only by
        # the peer timeout, 5 s, or by closing the writer: 1 s, then close)
        await asyncio.wait([streamer], timeout=1)
        await asyncio.wait_for(a.close(), 30)
        await asyncio.wait_for(streamer, 30)
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        got = collections.Counter("ok" if r is None else type(r).__name__ for r in results)
        outcome += got
        where = f"seed={seed} round {round_}"
        assert all(r is None or isinstance(r, TransferError) for r in results), \
            f"{where}: {dict(got)}"
        assert got["ok"] >= 1, f"{where}: no write succeeded before the close: {dict(got)}"
        slots = dst.reshape(window, size)
        for i, r in enumerate(results):
            if r is None:
                assert_bytes(slots[i % window], src, f"{where}: slot {i % window}, "
                             "its write succeeded")
        stray = ~((slots == src) | (slots == 0))
        assert not stray.any(), \
            f"{where}: {int(stray.sum())} bytes neither the source's nor untouched"
    return dict(outcome)


async def stale_descriptor(make_engine, provider: str, seed: int) -> dict:
    """After deregister, the old descriptor no longer reaches the memory.
    The write fails (tcp, sockets) or never completes (udp;ofi_rxd and shm
    drop it); it must not succeed or change a byte.  A write still pending
    after a second is resolved by closing the writer."""
    rng = np.random.default_rng(seed)
    a = await make_engine(provider)
    b = await make_engine(provider)
    src = random_bytes(rng, 64 * 1024)
    dst = np.zeros(64 * 1024, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    desc = dmr.descriptor
    await a.write(smr, desc, length=10, imm=1)
    await b.expect_imm(1, 1, timeout=30)
    b.deregister(dmr)
    before = dst.copy()
    fut = a.write(smr, desc, imm=2)
    done, _ = await asyncio.wait([fut], timeout=1.0)
    if done:
        outcome = type(fut.exception()).__name__ if fut.exception() else "success"
        assert isinstance(fut.exception(), TransferError), \
            f"a write through a stale descriptor ended with {outcome}"
    else:
        outcome = "pending"
        await a.close()
        try:
            await fut
        except EngineClosedError:
            pass
        else:
            raise AssertionError("close() did not fail the pending write")
    await asyncio.sleep(0.1)
    assert_bytes(dst, before, f"seed={seed}: a write through a stale descriptor changed bytes")
    assert b.imm_counter(2).total == 0, "the stale write delivered its immediate"
    return {"outcome": outcome}


def _in_child(scenario):
    async def run(provider: str, seed: int, *args) -> Any:
        factory = EngineFactory()
        try:
            return await scenario(factory, provider, seed, *args)
        finally:
            await factory.close()
    return run


SCENARIOS = {"close_sender_in_flight": _in_child(close_sender_in_flight),
             "close_target_mid_stream": _in_child(close_target_mid_stream),
             "stale_descriptor": _in_child(stale_descriptor)}


async def run_scenario(name: str, make_engine, children, provider: str, seed: int, *args,
                       isolate: bool) -> Any:
    """Run a scenario here, or (isolate=True) in a spawned child so that a
    crash inside libfabric fails only the calling test."""
    if isolate:
        return await run_isolated(children, name, provider, seed, *args)
    return await SCENARIOS_IN_PROCESS[name](make_engine, provider, seed, *args)


SCENARIOS_IN_PROCESS = {"close_sender_in_flight": close_sender_in_flight,
                        "close_target_mid_stream": close_target_mid_stream,
                        "stale_descriptor": stale_descriptor}


async def run_isolated(children, name: str, *args, timeout: float = 120.0) -> Any:
    """Parent side: run SCENARIOS[name](*args) in a spawned child; return its
    result, or raise AssertionError naming the child's exception or signal."""
    import signal
    proc, conn = children.start(isolated_main, name, args)
    msg = None
    try:
        msg = await pipe_recv(conn, timeout)
    except (TimeoutError, EOFError, OSError):
        pass
    await asyncio.to_thread(proc.join, 30)
    if proc.exitcode is None:
        proc.kill()
        await asyncio.to_thread(proc.join, 10)
        raise AssertionError(f"scenario {name} {args}: child hung, killed")
    if proc.exitcode < 0:
        raise AssertionError(f"scenario {name} {args}: child died with "
                             f"{signal.Signals(-proc.exitcode).name}")
    if msg is None:
        raise AssertionError(f"scenario {name} {args}: child exited with code {proc.exitcode} "
                             "without a report: it crashed (see its captured stderr)")
    kind, payload = msg
    if kind == "error":
        raise AssertionError(f"scenario {name} {args} failed in the child:\n{payload}")
    assert proc.exitcode == 0, proc.exitcode
    return payload


__all__ = ["receiver_main", "writer_main", "isolated_main", "PlanBuilder", "run_ops",
           "pipe_recv", "expected_regions", "close_sender_in_flight", "ECHO_IMM",
           "TransferError"]
