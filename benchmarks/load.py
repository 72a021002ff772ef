"""Load test: N engines in separate processes, all-to-all, every byte and
every immediate checked.

Each engine (one spawned process each, tcp over 127.0.0.1 by default)
registers one receive region per peer and one source region, then posts
``--ops`` operations spread over all its peers, at most ``--window`` in
flight: writes of random sizes (1 B .. 64 KiB, some of 0 B) to random
offsets, most with an immediate; paged writes (1..16 pages of 64, 1000 or
4096 bytes, random page lists and strides, one immediate per page);
``write_imm`` (some with a value every sender uses); and a few control
messages.  The plan of every (sender, receiver) pair is derived from the
seed, so each receiver recomputes what it must hold without being told.
When every sender is done, every receiver checks:

* every byte of every receive region (untouched bytes keep their random fill);
* for every immediate value, exactly the planned number of arrivals (zero
  lost, zero duplicated), and no arrival of any other value
  (``imms_received`` summed over NICs equals the plan);
* every control message exactly once.

    python benchmarks/load.py                          # 32 engines x 10,000 operations
    python benchmarks/load.py --engines 6 --ops 500    # the short version (tests/test_load.py)
    python benchmarks/load.py --json benchmarks/results/load.json

Memory: ``--region-kib`` per peer per engine (default 2048) plus a 1 MiB
source: about 63 MiB of regions per engine at 32 engines (2 GiB in all),
plus each interpreter.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import aiotransfer  # noqa: E402
from aiotransfer.progress import ProgressBar  # noqa: E402

KIB = 1 << 10
MIB = 1 << 20
SRC_SIZE = 1 * MIB
SHARED_IMM = 0xC0FFEE        # a value every sender uses
STEP_TIMEOUT = 300.0


# -------------------------------------------------------------------- plans

def source(seed: int, sender: int, size: int = SRC_SIZE) -> np.ndarray:
    return np.random.default_rng([seed, sender, 9]).integers(0, 256, size, dtype=np.uint8)


def fill(seed: int, receiver: int, sender: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, receiver, sender, 7]).integers(0, 256, size,
                                                                       dtype=np.uint8)


def ops_for_pair(ops: int, n: int, sender: int, receiver: int) -> int:
    """``ops`` operations of one sender spread over its n-1 peers."""
    peers = [j for j in range(n) if j != sender]
    k = peers.index(receiver)
    return ops // (n - 1) + (1 if k < ops % (n - 1) else 0)


def pair_plan(seed: int, sender: int, receiver: int, nops: int, region: int,
              src_size: int = SRC_SIZE) -> dict:
    """The operations ``sender`` posts to ``receiver``, where their bytes
    land, and how many immediates of each value arrive."""
    rng = np.random.default_rng([seed, sender, receiver, 1])
    ops: list[tuple] = []
    placements: list[tuple[int, int, int]] = []     # (dst_off, src_off, n)
    imms: collections.Counter = collections.Counter()
    msgs: list[bytes] = []
    cursor = 0
    fallbacks = 0
    base_imm = sender * 4096

    def slot(n: int) -> int | None:
        nonlocal cursor
        do = cursor + int(rng.integers(0, 64))
        if do + n > region:
            return None
        cursor = do + n
        return do

    for k in range(nops):
        u = rng.random()
        if u < 0.5:                                   # write
            c = rng.random()
            if c < 0.02:
                n = 0
            elif c < 0.62:
                n = int(rng.integers(1, 512))
            elif c < 0.97:
                n = int(rng.integers(512, 8 * KIB))
            else:
                n = int(rng.integers(8 * KIB, 64 * KIB + 1))
            imm = base_imm + int(rng.integers(0, 16)) if rng.random() < 0.8 else None
            do = slot(n)
            if do is not None:
                so = int(rng.integers(0, src_size - n + 1))
                ops.append(("write", so, do, n, imm))
                placements.append((do, so, n))
                if imm is not None:
                    imms[imm] += 1
                continue
            fallbacks += 1
        elif u < 0.7:                                 # paged write
            ps = int(rng.choice([64, 1000, 4096]))
            npages = int(rng.integers(1, 17))
            ds = ps + int(rng.integers(0, 16))
            ss = ps + int(rng.integers(0, 16))
            base = slot(npages * ds)
            if base is not None:
                sp = rng.integers(0, (src_size - ps) // ss + 1, npages)
                dp = rng.permutation(npages)
                imm = base_imm + 1024 + int(rng.integers(0, 16)) if rng.random() < 0.9 else None
                ops.append(("paged", sp.astype(np.int64), dp.astype(np.int64), ps, ss, ds, base,
                            imm))
                for s_, d_ in zip(sp, dp):
                    placements.append((base + int(d_) * ds, int(s_) * ss, ps))
                if imm is not None:
                    imms[imm] += npages
                continue
            fallbacks += 1
        elif u >= 0.95:                               # control message
            data = b"%d>%d #%d " % (sender, receiver, k) + \
                rng.integers(0, 256, int(rng.integers(0, 1024)), dtype=np.uint8).tobytes()
            ops.append(("send", data))
            msgs.append(data)
            continue
        # write_imm (also where a region is full)
        imm = SHARED_IMM if rng.random() < 0.1 else base_imm + 2048 + int(rng.integers(0, 16))
        ops.append(("imm", imm))
        imms[imm] += 1
    return {"ops": ops, "placements": placements, "imms": imms, "msgs": msgs,
            "fallbacks": fallbacks, "bytes": sum(p[2] for p in placements)}


# -------------------------------------------------------------------- child

def child_main(conn, index: int, n: int, cfg: dict, progress) -> None:
    os.chdir(tempfile.gettempdir())   # crash reports land there, not in the project
    try:
        asyncio.run(_child(conn, index, n, cfg, progress))
    except BaseException:
        try:
            conn.send(("error", index, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent may be gone
            pass
        raise


async def _recv(conn, timeout: float = STEP_TIMEOUT) -> Any:
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError(f"nothing from the parent for {timeout} s")
    return conn.recv()


async def _child(conn, i: int, n: int, cfg: dict, progress) -> None:
    seed, region, provider = cfg["seed"], cfg["region"], cfg["provider"]
    kwargs = {"nics": None if provider == "shm" else ["lo"]}
    if cfg.get("peer_timeout"):
        kwargs["peer_timeout"] = cfg["peer_timeout"]
    async with aiotransfer.TransferEngine(provider, **kwargs) as engine:
        bufs = {j: fill(seed, i, j, region) for j in range(n) if j != i}
        mrs = {j: engine.register(b) for j, b in bufs.items()}
        smr = engine.register(source(seed, i))
        conn.send(("ready", i, engine.address,
                   [mrs[j].descriptor if j != i else None for j in range(n)]))
        kind, addresses, descs = await _recv(conn)
        assert kind == "peers", kind

        # ---- send: every peer's plan, interleaved, at most `window` in flight
        plans = {j: pair_plan(seed, i, j, ops_for_pair(cfg["ops"], n, i, j), region)
                 for j in range(n) if j != i}
        work = [(j, op) for j, p in plans.items() for op in p["ops"]]
        order = np.random.default_rng([seed, i, 3]).permutation(len(work))
        window = cfg["window"]
        state = {"inflight": 0, "done": 0, "errors": []}
        room = asyncio.Event()

        def finished(fut: asyncio.Future) -> None:
            state["inflight"] -= 1
            state["done"] += 1
            if fut.cancelled():
                state["errors"].append("an operation was cancelled")
            elif fut.exception() is not None:
                state["errors"].append(repr(fut.exception()))
            if state["inflight"] < window:
                room.set()

        dests = {j: aiotransfer.RemoteRegion.from_bytes(descs[j]) for j in plans}
        t0 = time.perf_counter()
        for k, w in enumerate(order):
            j, op = work[w]
            while state["inflight"] >= window:
                room.clear()
                await room.wait()
            kind_ = op[0]
            if kind_ == "write":
                _, so, do, nb, imm = op
                fut = engine.write(smr, dests[j], length=nb, src_offset=so, dst_offset=do, imm=imm)
            elif kind_ == "paged":
                _, sp, dp, ps, ss, ds, base, imm = op
                fut = engine.write_paged(smr, sp, dests[j], dp, page_size=ps, src_stride=ss,
                                         dst_stride=ds, dst_offset=base, imm=imm)
            elif kind_ == "imm":
                fut = engine.write_imm(dests[j], op[1])
            else:
                fut = engine.send(addresses[j], op[1])
            state["inflight"] += 1
            fut.add_done_callback(finished)
            if k % 64 == 0:
                progress[i] = state["done"]
        while state["inflight"]:
            room.clear()
            await room.wait()
        progress[i] = state["done"]
        send_s = time.perf_counter() - t0
        sent = {"ops": len(work), "errors": state["errors"][:20],
                "n_errors": len(state["errors"]), "seconds": send_s,
                "bytes": sum(p["bytes"] for p in plans.values()),
                "fallbacks": sum(p["fallbacks"] for p in plans.values())}
        conn.send(("sent", i, sent))

        # ---- check: everything every peer sent us
        kind, *_ = await _recv(conn)
        assert kind == "check", kind
        errors: list[str] = []
        want: collections.Counter = collections.Counter()
        want_msgs: collections.Counter = collections.Counter()
        incoming = {}
        for j in plans:
            p = pair_plan(seed, j, i, ops_for_pair(cfg["ops"], n, j, i), region)
            incoming[j] = p
            want.update(p["imms"])
            want_msgs.update(p["msgs"])
        deadline = time.monotonic() + 60
        for imm, count in want.items():
            c = engine.imm_counter(imm)
            while c.total < count and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        got_msgs: collections.Counter = collections.Counter()
        for _ in range(sum(want_msgs.values())):
            try:
                got_msgs[await engine.recv(timeout=max(1.0, deadline - time.monotonic()))] += 1
            except TimeoutError:
                break
        await asyncio.sleep(0.2)    # anything extra shows up now
        while True:
            try:
                got_msgs[await engine.recv(timeout=0.05)] += 1
            except TimeoutError:
                break
        lost = dup = 0
        for imm, count in want.items():
            total = engine.imm_counter(imm).total
            if total != count:
                errors.append(f"imm {imm:#x}: {total} arrivals, expected {count}")
                lost += max(0, count - total)
                dup += max(0, total - count)
        received = sum(s["imms_received"] for s in engine.stats())
        if received != sum(want.values()):
            errors.append(f"{received} immediates received in all, expected {sum(want.values())}")
        if got_msgs != want_msgs:
            errors.append(f"messages: {sum((want_msgs - got_msgs).values())} missing, "
                          f"{sum((got_msgs - want_msgs).values())} unexpected")
        checked = 0
        for j, p in incoming.items():
            exp = fill(seed, i, j, region)
            src = source(seed, j)
            for do, so, nb in p["placements"]:
                exp[do:do + nb] = src[so:so + nb]
            buf = bufs[j]
            if not np.array_equal(buf, exp):
                bad = np.flatnonzero(buf != exp)
                errors.append(f"region of sender {j}: {bad.size} bytes differ, first at "
                              f"{int(bad[0])}")
            checked += buf.nbytes
        conn.send(("result", i, {"errors": errors, "imms": sum(want.values()),
                                 "imm_values": len(want), "lost": lost, "duplicated": dup,
                                 "msgs": sum(got_msgs.values()), "bytes_checked": checked,
                                 "stats": engine.stats()}))
        kind, *_ = await _recv(conn)
        assert kind == "bye", kind


# ------------------------------------------------------------------- parent

class ChildFailed(RuntimeError):
    pass


def _collect(conns: list, kind: str, timeout: float, on_wait=None) -> dict[int, Any]:
    """One message of ``kind`` from every child (index -> payload)."""
    from multiprocessing.connection import wait
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    pending = {c: k for k, c in enumerate(conns)}
    while pending:
        if time.monotonic() > deadline:
            raise ChildFailed(f"timed out after {timeout} s waiting for {kind!r} from "
                              f"children {sorted(pending.values())}")
        for c in wait(list(pending), timeout=0.1):
            try:
                msg = c.recv()
            except EOFError:
                raise ChildFailed(f"child {pending[c]} went away before {kind!r}") from None
            if msg[0] == "error":
                raise ChildFailed(f"child {msg[1]} failed:\n{msg[2]}")
            if msg[0] != kind:
                raise ChildFailed(f"expected {kind!r} from child {pending[c]}, got {msg[0]!r}")
            if kind == "ready":
                out[msg[1]] = msg[2:]
            else:
                out[msg[1]] = msg[2]
            del pending[c]
        if on_wait is not None:
            on_wait()
    return out


def run(engines: int = 32, ops: int = 10_000, *, provider: str = "tcp", region_kib: int = 2048,
        window: int = 64, seed: int = 1, peer_timeout: float | None = None,
        progress: bool = True, stream=None) -> dict:
    """Run the load test; returns a summary (``summary["errors"]`` empty on success)."""
    if engines < 2:
        raise ValueError("engines must be at least 2")
    ctx = multiprocessing.get_context("spawn")
    cfg = {"seed": seed, "region": region_kib * KIB, "provider": provider, "ops": ops,
           "window": window, "peer_timeout": peer_timeout}
    counters = ctx.Array("q", engines, lock=False)
    procs, conns = [], []
    t_start = time.perf_counter()
    try:
        for i in range(engines):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=child_main, args=(child, i, engines, cfg, counters),
                            daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        ready = _collect(conns, "ready", 300)
        t_ready = time.perf_counter()
        addresses = [ready[i][0] for i in range(engines)]
        for i, c in enumerate(conns):
            c.send(("peers", addresses, [ready[j][1][i] if j != i else None
                                         for j in range(engines)]))
        bar = ProgressBar(engines * ops, f"load {engines}x{ops}", " ops",
                          stream=stream) if progress else None
        sent = _collect(conns, "sent", 3600,
                        on_wait=(lambda: bar.update_to(sum(counters))) if bar else None)
        t_sent = time.perf_counter()
        if bar:
            bar.close()
        for c in conns:
            c.send(("check",))
        results = _collect(conns, "result", 600)
        t_checked = time.perf_counter()
        for c in conns:
            c.send(("bye",))
        for p in procs:
            p.join(60)
        exitcodes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        for c in conns:
            c.close()
    errors = []
    for i in range(engines):
        s, r = sent[i], results[i]
        errors += [f"engine {i} (sending): {e}" for e in s["errors"]]
        if s["n_errors"] > len(s["errors"]):
            errors.append(f"engine {i}: {s['n_errors'] - len(s['errors'])} more failed ops")
        errors += [f"engine {i} (receiving): {e}" for e in r["errors"]]
    errors += [f"engine {i} exited with {code}" for i, code in enumerate(exitcodes) if code != 0]
    total_bytes = sum(s["bytes"] for s in sent.values())
    send_time = t_sent - t_ready
    stats = [r["stats"] for r in results.values()]
    return {
        "engines": engines, "ops_per_engine": ops, "provider": provider,
        "region_kib_per_peer": region_kib, "window": window, "seed": seed,
        "ops": sum(s["ops"] for s in sent.values()),
        "bytes": total_bytes,
        "immediates": sum(r["imms"] for r in results.values()),
        "immediate_values": sum(r["imm_values"] for r in results.values()),
        "lost_immediates": sum(r["lost"] for r in results.values()),
        "duplicated_immediates": sum(r["duplicated"] for r in results.values()),
        "messages": sum(r["msgs"] for r in results.values()),
        "bytes_checked": sum(r["bytes_checked"] for r in results.values()),
        "fallbacks": sum(s["fallbacks"] for s in sent.values()),
        "startup_s": round(t_ready - t_start, 2),
        "send_s": round(send_time, 2),
        "check_s": round(t_checked - t_sent, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "ops_per_s": round(sum(s["ops"] for s in sent.values()) / send_time),
        "gbytes_per_s": round(total_bytes / send_time / 1e9, 3),
        "provider_errors": sum(x["errors"] for st in stats for x in st),
        "eagain": sum(x["eagain"] for st in stats for x in st),
        "errors": errors,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=int, default=32)
    ap.add_argument("--ops", type=int, default=10_000, help="operations per engine")
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--region-kib", type=int, default=2048, help="receive region per peer")
    ap.add_argument("--window", type=int, default=64, help="operations in flight per engine")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peer-timeout", type=float, default=None,
                    help="engines' peer_timeout (default: the engine's)")
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args(argv)
    s = run(args.engines, args.ops, provider=args.provider, region_kib=args.region_kib,
            window=args.window, seed=args.seed, peer_timeout=args.peer_timeout)
    print(f"{s['engines']} engines x {s['ops_per_engine']} operations ({s['provider']}), "
          f"all-to-all, seed {s['seed']}")
    print(f"  operations     {s['ops']:,} ({s['ops_per_s']:,}/s while sending)")
    print(f"  bytes written  {s['bytes']:,} ({s['gbytes_per_s']} GB/s)")
    print(f"  immediates     {s['immediates']:,} over {s['immediate_values']:,} values: "
          f"{s['lost_immediates']} lost, {s['duplicated_immediates']} duplicated")
    print(f"  messages       {s['messages']:,}")
    print(f"  bytes checked  {s['bytes_checked']:,}")
    print(f"  time           start {s['startup_s']} s, send {s['send_s']} s, "
          f"check {s['check_s']} s, total {s['total_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(s, indent=1) + "\n")
    if s["errors"]:
        print(f"FAILED: {len(s['errors'])} problems")
        for e in s["errors"][:50]:
            print("  " + e)
        return 1
    print("OK: every byte and every immediate as planned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
