"""The main job on an embedded default: two processes, paged writes, every byte checked.

The receiver registers a buffer and hands its descriptor to the sender.  The
sender streams pages into it with ``write_paged`` (one immediate per page, pages
scattered to a random permutation of the destination), the receiver awaits its
ImmCounter, verifies every byte, and tells the sender through an aiotransfer
control message that the next pass may start.  Both print throughput.

    python -m aiotransfer.demo [--provider auto|shm|tcp|sockets|udp] [--mib 256]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from . import TransferEngine, TransferError, alloc
from .progress import ProgressBar

IMM_PAGE = 0xD0          # one per page
PREFERENCE = ["shm", "tcp", "sockets", "udp"]


def engine_kwargs(provider: str) -> dict:
    # Network providers are pinned to loopback: the demo talks to itself.
    return {} if provider == "shm" else {"nics": ["lo"]}


def pick_provider() -> str:
    """The fastest provider that opens here (shm, then tcp, sockets, udp)."""

    async def works(p: str) -> bool:
        try:
            async with TransferEngine(p, **engine_kwargs(p)):
                return True
        except TransferError:
            return False

    for p in PREFERENCE:
        if asyncio.run(works(p)):
            return p
    raise SystemExit("no libfabric provider works here: install libfabric-bin and run "
                     "`fi_info` to see why")


def pattern(seed: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def permutation(seed: int, npages: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).permutation(npages).astype(np.int64)


async def receiver(provider: str, nbytes: int, page: int, passes: int, conn) -> None:
    npages = nbytes // page
    async with TransferEngine(provider, **engine_kwargs(provider)) as eng:
        dst = alloc(nbytes)   # 2 MiB-aligned, huge pages: fewer pages to pin
        mr = eng.register(dst)
        counter = eng.imm_counter(IMM_PAGE)
        conn.send((eng.address, mr.descriptor))
        sender_addr = conn.recv()
        for p in range(passes):
            expect = pattern(p, nbytes).reshape(npages, page)
            perm = permutation(p, npages)
            # the sender announces each pass with a control message that
            # carries its start time (both processes run on this host and
            # share CLOCK_MONOTONIC). Messages and writes are not ordered:
            # the message may come after some or all of the pass's writes,
            # so the receiver's own clock would start too late.
            msg = (await eng.recv(timeout=600)).decode(errors="replace").split()
            if len(msg) != 3 or msg[:2] != ["start", str(p)]:
                raise SystemExit(f"receiver: protocol error: {' '.join(msg)!r}")
            t0 = float(msg[2])
            bar = ProgressBar(npages * page, f"recv pass {p + 1}/{passes}", unit="B")
            waiter = asyncio.ensure_future(counter.wait(npages, timeout=600))
            while not waiter.done():
                bar.update_to((counter.total - p * npages) * page)
                await asyncio.wait([waiter], timeout=0.1)
            await waiter
            dt = time.monotonic() - t0
            bar.close()
            got = dst.reshape(npages, page)[perm]
            bad = np.flatnonzero((got != expect).any(axis=1))
            if bad.size:
                raise SystemExit(f"receiver: {bad.size} of {npages} pages differ "
                                 f"(first: source page {bad[0]})")
            print(f"receiver: pass {p + 1}: {npages} pages x {page} B verified, "
                  f"{nbytes / dt / 1e9:.2f} GB/s at the receiver", flush=True)
            await eng.send(sender_addr, f"verified {p}".encode())
        eng.deregister(mr)


async def sender(provider: str, nbytes: int, page: int, passes: int, batch: int,
                 conn) -> None:
    npages = nbytes // page
    async with TransferEngine(provider, **engine_kwargs(provider)) as eng:
        src = alloc(nbytes)
        mr = eng.register(src)
        peer_addr, desc = conn.recv()
        conn.send(eng.address)
        for p in range(passes):
            src[:] = pattern(p, nbytes)
            perm = permutation(p, npages)
            bar = ProgressBar(npages * page, f"send pass {p + 1}/{passes}", unit="B")
            t0 = time.monotonic()
            await eng.send(peer_addr, f"start {p} {t0!r}".encode())
            inflight: set = set()
            for first in range(0, npages, batch):
                idx = np.arange(first, min(first + batch, npages), dtype=np.int64)
                fut = eng.write_paged(mr, idx, desc, perm[idx], page_size=page, imm=IMM_PAGE)
                fut.add_done_callback(lambda f, n=idx.size: bar.update(n * page))
                inflight.add(fut)
                if len(inflight) >= 8:
                    done, inflight = await asyncio.wait(inflight,
                                                        return_when=asyncio.FIRST_COMPLETED)
                    for f in done:
                        f.result()
            for f in asyncio.as_completed(inflight):
                await f
            dt = time.monotonic() - t0
            bar.close()
            print(f"sender:   pass {p + 1}: {nbytes / 2**20:.0f} MiB in {dt:.2f} s, "
                  f"{nbytes / dt / 1e9:.2f} GB/s", flush=True)
            msg = await eng.recv(timeout=600)
            if msg != f"verified {p}".encode():
                raise SystemExit(f"sender: unexpected message {msg!r}")
        eng.deregister(mr)


def _run(role: str, *args) -> None:
    try:
        asyncio.run(receiver(*args) if role == "receiver" else sender(*args))
    except SystemExit:
        raise
    except BaseException as exc:  # report, then fail the process
        print(f"{role}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiotransfer demo", description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default=os.environ.get("PROVIDER", "auto"),
                    help="auto (fastest that works), shm, tcp, sockets, udp")
    ap.add_argument("--mib", type=int, default=256, help="receiver buffer size (MiB)")
    ap.add_argument("--page", type=int, default=64 * 1024, help="page size in bytes")
    ap.add_argument("--passes", type=int, default=2, help="times the buffer is rewritten")
    ap.add_argument("--batch", type=int, default=256, help="pages per write_paged call")
    a = ap.parse_args(argv)
    provider = pick_provider() if a.provider in ("auto", "") else a.provider
    nbytes = a.mib << 20
    if a.page <= 0 or nbytes % a.page:
        ap.error("--page must divide the buffer size")
    print(f"aiotransfer demo: provider {provider}, {a.mib} MiB buffer, {a.page} B pages, "
          f"{a.passes} passes ({a.mib * a.passes} MiB streamed)", flush=True)
    ctx = mp.get_context("spawn")
    left, right = ctx.Pipe()
    procs = [ctx.Process(target=_run, args=("receiver", provider, nbytes, a.page, a.passes,
                                            left), name="receiver"),
             ctx.Process(target=_run, args=("sender", provider, nbytes, a.page, a.passes,
                                            a.batch, right), name="sender")]
    for p in procs:
        p.start()
    rc = 0
    try:
        for p in procs:
            p.join(timeout=1800)
            if p.exitcode != 0:
                rc = 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    print("demo: OK, every byte verified" if rc == 0 else "demo: FAILED", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
