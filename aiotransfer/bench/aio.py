"""aiotransfer backend of the harness: an engine per process, asyncio.

Styles (how the client issues its writes; each write carries an immediate,
the target counts the immediates):

- ``write``: one ``engine.write`` per write (one future each), ``window``
  writes in flight, refilled when half of them completed; completions are
  consumed through each future's done-callback.
- ``await``: ``window`` coroutines, each ``await engine.write(...)`` in turn:
  one awaitable per write, awaited by the code that issued it.
- ``pipeline``: one coroutine keeps ``window`` writes in flight in a deque;
  when it is full it awaits the oldest write's awaitable, then issues the
  next: every write's awaitable is awaited, in issue order (a completed one
  costs no trip through the loop; completions themselves come in any order).
- ``paged``: ``engine.write_paged`` calls of ``pages`` pages (default half a
  window), pages taken from a chain of random permutations of the slots,
  each page to the same index on the target; one immediate per page.
- ``pipeline-uvloop``: the pipeline style with both processes running
  uvloop's event loop instead of asyncio's (``pip install uvloop``).

``lat``: an 8-byte write with immediate, ping-pong; each side waits only for
the peer's immediate, the writes' own completions are collected at the end.
"""
from __future__ import annotations

import asyncio
import collections
import math

import numpy as np

import aiotransfer

from .common import (SEED_PONG, UVLOOP_SUFFIX, Point, cpu_seconds, now, pattern,
                     pattern_region, verify_region, zeros)

IMM_DATA = 1
IMM_PING = 2
IMM_PONG = 3


def _base_style(cfg: dict) -> str:
    return cfg.get("style", "write").removesuffix(UVLOOP_SUFFIX)


def _run_loop(coro, cfg: dict):
    """asyncio.run, or uvloop's loop for a ``-uvloop`` style."""
    if cfg.get("style", "").endswith(UVLOOP_SUFFIX):
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def unavailable(transport: str) -> str | None:
    try:
        aiotransfer.resolve_provider(transport)
    except Exception as exc:   # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _engine(cfg: dict) -> aiotransfer.TransferEngine:
    provider = aiotransfer.resolve_provider(cfg["transport"])
    kw = {"delivery_complete": cfg.get("delivery_complete", True)}
    if provider != "shm":
        kw["nics"] = ["lo"]
    return aiotransfer.TransferEngine(provider, **kw)


def paged_plan(point: Point, pages: int | None) -> tuple[int, int, int]:
    """(pages per call, warm-up calls, measured calls)."""
    k = max(1, pages or point.window // 2)
    return k, math.ceil(point.nwarm / k), math.ceil(point.iters / k)


def _op_counts(cfg: dict, point: Point) -> tuple[int, int]:
    """Immediates the target receives in the warm-up and in the measured phase."""
    if _base_style(cfg) == "paged":
        k, warm_calls, calls = paged_plan(point, point.pages)
        return warm_calls * k, calls * k
    return point.nwarm, point.iters


class _windowed:
    """Issue calls keeping at most `window` futures in flight; refill when half
    of them completed (one wake-up of the issuer per half window, as a real
    pipeline would do).  Every call's own future is observed through its
    done-callback, so each write still has its own awaitable."""

    def __init__(self, calls) -> None:
        self.calls = calls

    async def __call__(self, window: int) -> None:
        loop = asyncio.get_running_loop()
        state = {"inflight": 0, "waiter": None}
        errors: list = []
        low = window // 2

        def done(f: asyncio.Future) -> None:
            state["inflight"] -= 1
            if not f.cancelled() and f.exception() is not None:
                errors.append(f.exception())
            w = state["waiter"]
            if w is not None and state["inflight"] <= low and not w.done():
                w.set_result(None)

        for fn, args, kw in self.calls:
            if state["inflight"] >= window:
                state["waiter"] = loop.create_future()
                await state["waiter"]
                state["waiter"] = None
            if errors:
                raise errors[0]
            f = fn(*args, **kw)
            state["inflight"] += 1
            f.add_done_callback(done)
        low = 0
        while state["inflight"]:
            state["waiter"] = loop.create_future()
            await state["waiter"]
            state["waiter"] = None
        if errors:
            raise errors[0]


# ------------------------------------------------------------------ server

def server_main(conn, cfg: dict) -> dict:
    return _run_loop(_server(conn, cfg), cfg)


async def _server(conn, cfg: dict) -> dict:
    point = Point(**cfg["point"])
    async with _engine(cfg) as eng:
        dst = zeros(point.region)
        mr = eng.register(dst)
        back = eng.register(pattern(64, SEED_PONG))
        conn.send(mr.descriptor)
        peer_desc = conn.recv()
        res: dict = {}
        if point.mode == "lat":
            writes = []
            for _ in range(point.nwarm + point.iters):
                await eng.expect_imm(IMM_PING, 1, timeout=60)
                writes.append(eng.write(back, peer_desc, length=8, imm=IMM_PONG))
            await asyncio.gather(*writes)
            res["verified"] = bool(np.array_equal(dst[:8], pattern(8)))
        else:
            warm, ops = _op_counts(cfg, point)
            await eng.expect_imm(IMM_DATA, warm, timeout=300)
            c0 = cpu_seconds()
            await eng.expect_imm(IMM_DATA, ops, timeout=600)
            res["t_last"] = now()
            res["cpu"] = cpu_seconds() - c0
            await asyncio.sleep(0.01)
            extra = eng.imm_counter(IMM_DATA).value
            res["verified"] = verify_region(dst, point) and extra == 0
        res["stats"] = eng.stats()[0]
        conn.send("done")
        conn.recv()
        eng.deregister(mr)
        eng.deregister(back)
        return res


# ------------------------------------------------------------------ client

def client_main(conn, cfg: dict) -> dict:
    return _run_loop(_client(conn, cfg), cfg)


async def _client(conn, cfg: dict) -> dict:
    point = Point(**cfg["point"])
    style = _base_style(cfg)
    async with _engine(cfg) as eng:
        src = pattern_region(point.region)
        mr = eng.register(src)
        pong_buf = np.zeros(64, dtype=np.uint8)
        pong = eng.register(pong_buf)
        dst = aiotransfer.RemoteRegion.from_bytes(conn.recv())
        conn.send(pong.descriptor)
        out: dict = {}
        if point.mode == "lat":
            rtts = []
            writes = []
            for i in range(point.nwarm + point.iters):
                t = now()
                writes.append(eng.write(mr, dst, length=8, imm=IMM_PING))
                await eng.expect_imm(IMM_PONG, 1, timeout=60)
                if i >= point.nwarm:
                    rtts.append(now() - t)
            await asyncio.gather(*writes)
            out["rtt"] = rtts
            out["verified"] = bool(np.array_equal(pong_buf[:8], pattern(8, SEED_PONG)))
        else:
            run = {"write": _run_writes, "await": _run_awaits, "pipeline": _run_pipeline,
                   "paged": _run_paged}[style]
            await run(eng, mr, dst, point, out)
        out["stats"] = eng.stats()[0]
        conn.recv()          # the server is done
        conn.send("bye")
        eng.deregister(mr)
        eng.deregister(pong)
        return out


def _measure_into(out: dict):
    class _Phase:
        def __enter__(self):
            out["t_first"] = now()
            self.c0 = cpu_seconds()

        def __exit__(self, *exc):
            out["t_done"] = now()
            out["cpu"] = cpu_seconds() - self.c0
    return _Phase()


async def _run_writes(eng, mr, dst, point: Point, out: dict) -> None:
    size = point.size

    def calls(lo: int, hi: int):
        for i in range(lo, hi):
            off = point.slot(i) * size
            yield eng.write, (mr, dst), {"length": size, "src_offset": off, "dst_offset": off,
                                         "imm": IMM_DATA}

    n0 = point.nwarm
    await _windowed(calls(0, n0))(point.window)
    with _measure_into(out):
        await _windowed(calls(n0, n0 + point.iters))(point.window)


async def _run_awaits(eng, mr, dst, point: Point, out: dict) -> None:
    size = point.size

    async def worker(j: int, lo: int, hi: int) -> None:
        for i in range(j, hi, point.window):
            off = point.slot(i) * size
            await eng.write(mr, dst, length=size, src_offset=off, dst_offset=off, imm=IMM_DATA)

    async def phase(lo: int, hi: int) -> None:
        await asyncio.gather(*(worker(j, lo, hi) for j in range(lo, lo + point.window)))

    n0 = point.nwarm
    await phase(0, n0)
    with _measure_into(out):
        await phase(n0, n0 + point.iters)


async def _run_pipeline(eng, mr, dst, point: Point, out: dict) -> None:
    size, window = point.size, point.window
    offs = [point.slot(i) * size for i in range(window)]   # slot(i) repeats every window
    write = eng.write

    async def phase(lo: int, hi: int) -> None:
        q: collections.deque = collections.deque()
        for i in range(lo, hi):
            if len(q) >= window:
                await q.popleft()
            off = offs[i % window]
            q.append(write(mr, dst, length=size, src_offset=off, dst_offset=off, imm=IMM_DATA))
        while q:
            await q.popleft()

    n0 = point.nwarm
    await phase(0, n0)
    with _measure_into(out):
        await phase(n0, n0 + point.iters)


async def _run_paged(eng, mr, dst, point: Point, out: dict) -> None:
    k, warm_calls, calls = paged_plan(point, point.pages)
    total = (warm_calls + calls) * k
    rng = np.random.default_rng(1)
    order = np.concatenate([rng.permutation(point.slots)
                            for _ in range(math.ceil(total / point.slots))])[:total]
    pages = [order[c * k:(c + 1) * k].astype(np.int64) for c in range(warm_calls + calls)]
    in_flight = max(1, point.window // k)

    def issue(lo: int, hi: int):
        return ((eng.write_paged, (mr, p, dst, p), {"page_size": point.size, "imm": IMM_DATA})
                for p in pages[lo:hi])

    await _windowed(issue(0, warm_calls))(in_flight)
    with _measure_into(out):
        await _windowed(issue(warm_calls, warm_calls + calls))(in_flight)
    out["ops"] = calls * k


# -------------------------------------------------------------------- idle

def idle_main(conn, cfg: dict) -> dict:
    async def run() -> None:
        async with _engine(cfg) as eng:
            mr = eng.register(np.zeros(1 << 20, dtype=np.uint8))
            conn.send("ready")
            await asyncio.to_thread(conn.recv)
            eng.deregister(mr)
    asyncio.run(run())
    return {}


def versions() -> dict:
    return {"aiotransfer": aiotransfer.__version__}
