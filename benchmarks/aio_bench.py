"""aiotransfer side of the core benchmark: the same modes as fi_rawbench.c.

``run_aio(provider, mode, size, window, iters, pages=None)`` starts a server
and a client in two separate processes (multiprocessing, spawn) and returns a
dict with the keys of the raw C reference (benchmarks/raw/rawbench.py):

- ``bw``/``rate``: ``window`` writes of ``size`` bytes in flight, each one
  awaitable with an immediate (one ``engine.write`` per write).
- ``paged``: ``write_paged`` calls of ``pages`` pages of ``size`` bytes each,
  random page indices (fixed seed), ``window`` pages in flight; one immediate
  per page.
- ``lat``: 8-byte write with immediate, ping-pong; one-way = RTT/2.

Throughput at the receiver: the server consumes the first immediate, starts
its clock, then awaits the remaining n-1; (n-1) writes over that span.
After a bandwidth run the server verifies the bytes of the last pass.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

import aiotransfer

IMM_DATA = 1
IMM_PING = 2
IMM_PONG = 3


def _kw(provider: str, delivery_complete: bool) -> dict:
    kw: dict[str, Any] = {"delivery_complete": delivery_complete}
    if provider != "shm":
        kw["nics"] = ["lo"]
    return kw


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu() -> dict:
    """CPU seconds per thread of this process (diagnostics)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _now() -> float:
    # both processes read the same CLOCK_MONOTONIC (as fi_rawbench.c does)
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _fill(buf: np.ndarray, seed: int) -> None:
    buf[:] = np.random.default_rng(seed).integers(0, 256, buf.size, dtype=np.uint8)


class _windowed:
    """Issue calls keeping at most `window` awaitables in flight; refill when
    half of them completed (one wake-up of the issuer per half window, as a
    real pipeline would do).  Every call's own future is awaited through its
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


def _region_size(mode: str, size: int, window: int, pages: int | None) -> int:
    if mode == "paged":
        return max(size * max(pages or 1, 1) * 4, 1 << 16)
    return max(size * window, 1 << 16)


async def _server(provider: str, mode: str, size: int, window: int, iters: int, warmup: int,
                  pages: int | None, dc: bool, conn) -> None:
    async with aiotransfer.TransferEngine(provider, **_kw(provider, dc)) as eng:
        nbytes = _region_size(mode, size, window, pages)
        dst = np.zeros(nbytes, dtype=np.uint8)
        mr = eng.register(dst)
        back = eng.register(np.zeros(64, dtype=np.uint8))
        conn.send((eng.address, mr.descriptor))
        peer_desc = conn.recv()
        res: dict[str, Any] = {}
        if mode == "lat":
            # like fi_rawbench: wait only for the immediate; the writes'
            # own completions are collected at the end
            writes = []
            for _ in range(warmup + iters):
                await eng.expect_imm(IMM_PING, 1)
                writes.append(eng.write(back, peer_desc, length=8, imm=IMM_PONG))
            await asyncio.gather(*writes)
        else:
            await eng.expect_imm(IMM_DATA, warmup, timeout=300)
            c0 = _cpu()
            await eng.expect_imm(IMM_DATA, 1, timeout=300)
            t0 = _now()
            await eng.expect_imm(IMM_DATA, iters - 1, timeout=600)
            t1 = _now()
            res["cpu_server"] = _cpu() - c0
            res["recv_span"] = t1 - t0
            res["t_last"] = t1
            # verification of the last pass: the client tells what it wrote where
            expect = conn.recv()
            ok = True
            for src_bytes, dst_off in expect:
                got = dst[dst_off:dst_off + len(src_bytes)].tobytes()
                ok &= got == src_bytes
            res["verified"] = ok
        res["stats_server"] = eng.stats()[0]
        res["threads_server"] = _thread_cpu()
        conn.send(res)
        conn.recv()  # client done
        eng.deregister(mr)
        eng.deregister(back)


async def _client(provider: str, mode: str, size: int, window: int, iters: int, warmup: int,
                  pages: int | None, dc: bool, conn) -> dict:
    async with aiotransfer.TransferEngine(provider, **_kw(provider, dc)) as eng:
        nbytes = _region_size(mode, size, window, pages)
        src = np.empty(nbytes, dtype=np.uint8)
        _fill(src, 7)
        mr = eng.register(src)
        pong = eng.register(np.zeros(64, dtype=np.uint8))
        _addr, desc = conn.recv()
        conn.send(pong.descriptor)
        dst = aiotransfer.RemoteRegion.from_bytes(desc)
        out: dict[str, Any] = {}
        if mode == "lat":
            rtts = []
            writes = []
            for i in range(warmup + iters):
                t = time.perf_counter()
                writes.append(eng.write(mr, dst, length=8, imm=IMM_PING))
                await eng.expect_imm(IMM_PONG, 1)
                if i >= warmup:
                    rtts.append(time.perf_counter() - t)
            await asyncio.gather(*writes)
            rtts.sort()
            out["lat_us_median"] = statistics.median(rtts) / 2 * 1e6
            out["lat_us_p99"] = rtts[int(len(rtts) * 0.99) - 1] / 2 * 1e6
        elif mode == "paged":
            npages_region = nbytes // size
            rng = np.random.default_rng(1)
            per_call = pages or 1024
            calls_window = max(1, window // per_call)
            # the first `warmup` pages are warm-up: split calls at that boundary
            sizes = []
            left_w, left_m = warmup, iters
            while left_w > 0:
                sizes.append(min(per_call, left_w))
                left_w -= sizes[-1]
            while left_m > 0:
                sizes.append(min(per_call, left_m))
                left_m -= sizes[-1]
            plan = [(rng.integers(0, npages_region, n).astype(np.int64),
                     rng.permutation(npages_region)[:n].astype(np.int64)) for n in sizes]
            nwarm = 0
            left = warmup
            while left > 0:
                left -= sizes[nwarm]
                nwarm += 1
            await _windowed((eng.write_paged, (mr, sp, dst, dp),
                             {"page_size": size, "imm": IMM_DATA})
                            for sp, dp in plan[:nwarm])(calls_window)
            c0 = _cpu()
            t0 = _now()
            await _windowed((eng.write_paged, (mr, sp, dst, dp),
                             {"page_size": size, "imm": IMM_DATA})
                            for sp, dp in plan[nwarm:])(calls_window)
            t1 = _now()
            out["t_first"] = t0
            out["cpu_client"] = _cpu() - c0
            out["send_span"] = t1 - t0
            # expected bytes of the last call's pages (later calls may overwrite: use last)
            sp, dp = plan[-1]
            seen = {}
            for s_i, d_i in zip(sp.tolist(), dp.tolist()):
                seen[d_i] = s_i
            conn.send([(src[s * size:(s + 1) * size].tobytes(), d * size)
                       for d, s in list(seen.items())[:64]])
        else:
            slots = max(1, nbytes // size) if size else 1
            n = warmup + iters
            def calls(lo: int, hi: int):
                return ((eng.write, (mr, dst),
                         {"length": size, "src_offset": (i % slots) * size,
                          "dst_offset": (i % slots) * size, "imm": IMM_DATA})
                        for i in range(lo, hi))

            await _windowed(calls(0, warmup))(window)
            c0 = _cpu()
            t0 = _now()
            await _windowed(calls(warmup, n))(window)
            t1 = _now()
            out["t_first"] = t0
            out["cpu_client"] = _cpu() - c0
            out["send_span"] = t1 - t0
            last = [((n - 1 - k) % slots) * size for k in range(min(slots, n))]
            conn.send([(src[o:o + size].tobytes(), o) for o in last[:64]])
        out["stats_client"] = eng.stats()[0]
        out["threads_client"] = _thread_cpu()
        srv = conn.recv()
        conn.send("done")
        eng.deregister(mr)
        eng.deregister(pong)
        out.update(srv)
        return out


def idle_cpu(provider: str, seconds: float = 3.0) -> float:
    """Percent of one core used by an open, idle engine (process CPU time)."""

    async def run() -> float:
        async with aiotransfer.TransferEngine(provider, **_kw(provider, True)):
            await asyncio.sleep(0.3)   # past the post-start activity
            c0, t0 = _cpu(), time.perf_counter()
            await asyncio.sleep(seconds)
            return (_cpu() - c0) / (time.perf_counter() - t0) * 100

    return asyncio.run(run())


def _server_main(*args) -> None:
    asyncio.run(_server(*args))


def run_aio(provider: str, mode: str, size: int, window: int, iters: int, *,
            pages: int | None = None, delivery_complete: bool = True,
            warmup: int | None = None, timeout: float = 300) -> dict:
    """Run one point in two processes; returns a result dict (see module doc)."""
    provider = aiotransfer.resolve_provider(provider)
    if warmup is None:
        warmup = max(iters // 10, min(iters, 16))
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    srv = ctx.Process(target=_server_main,
                      args=(provider, mode, size, window, iters, warmup, pages,
                            delivery_complete, a), daemon=True)
    srv.start()
    try:
        out = asyncio.run(asyncio.wait_for(
            _client(provider, mode, size, window, iters, warmup, pages, delivery_complete, b),
            timeout))
        srv.join(30)
    finally:
        if srv.is_alive():
            srv.kill()
            srv.join()
    res: dict[str, Any] = {"impl": "aiotransfer", "provider": provider, "mode": mode,
                           "size": size, "window": window, "iters": iters, "pages": pages,
                           "delivery_complete": delivery_complete}
    res["stats_client"] = out.get("stats_client")
    res["threads_client"] = out.get("threads_client")
    res["threads_server"] = out.get("threads_server")
    res["stats_server"] = out.get("stats_server")
    if mode == "lat":
        res["lat_us_median"] = out["lat_us_median"]
        res["lat_us_p99"] = out["lat_us_p99"]
        res["verified"] = True
    else:
        span = out["recv_span"]
        res["gbps_recv"] = (iters - 1) * size / span / 1e9 if span > 0 else None
        res["mops"] = (iters - 1) / span / 1e6 if span > 0 else None
        res["gbps_send"] = iters * size / out["send_span"] / 1e9
        e2e = out["t_last"] - out["t_first"]
        res["gbps_e2e"] = iters * size / e2e / 1e9 if e2e > 0 else None
        res["mops_e2e"] = iters / e2e / 1e6 if e2e > 0 else None
        res["cpu_us_per_op_client"] = out["cpu_client"] / iters * 1e6
        res["cpu_us_per_op_server"] = out["cpu_server"] / iters * 1e6
        res["verified"] = out["verified"]
    return res


if __name__ == "__main__":
    import json

    prov = sys.argv[1] if len(sys.argv) > 1 else "shm"
    for mode, size, window, iters, pages in [("bw", 65536, 64, 20000, None),
                                             ("rate", 8, 64, 100000, None),
                                             ("paged", 8, 4096, 400000, 1024),
                                             ("lat", 8, 1, 2000, None)]:
        print(json.dumps(run_aio(prov, mode, size, window, iters, pages=pages)), flush=True)
    os._exit(0)
