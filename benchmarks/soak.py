"""Soak: two engines in separate processes exchange a steady, verified mixed
load; resident memory, open file descriptors and throughput are sampled
over time.

Each process writes to the other in rounds.  A round is 32..96 operations
into one half of the peer's 2 x 1 MiB receive region: writes of random
sizes (0 B .. 128 KiB) at random offsets, paged writes (1..16 pages of 64,
1000 or 4096 bytes), ``write_imm`` and a few control messages; every write,
page and ``write_imm`` carries the round's immediate value (256 values in
rotation).  The receiver recomputes the round from the seed, waits for
exactly that many immediates (``expect_imm``) and the round's messages,
checks every byte of the half, zeroes it and acknowledges with a message; a
sender starts round r only after round r-2 was acknowledged.  Any
difference stops the run.

Every ``--interval`` seconds the parent samples both processes' VmRSS
(/proc/<pid>/status) and open fds (/proc/<pid>/fd) and the operations and
bytes completed since the last sample.  At the end it compares the last
``--window`` seconds with the first ``--window`` seconds after ``--warmup``:
RSS and fds must grow by less than 5% and throughput must stay at least 0.9x.

    python benchmarks/soak.py --minutes 10        # writes benchmarks/results/soak.json, docs/img/soak.png
    python benchmarks/soak.py --minutes 0.5 --interval 2 --warmup 6 --window 6 --no-plot
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import platform
import statistics
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

KIB = 1 << 10
MIB = 1 << 20
HALF = 1 * MIB
SRC_SIZE = 1 * MIB
VALUES = 256                 # immediate values in rotation (per sender)
STEP_TIMEOUT = 60.0


def source(seed: int, who: int) -> np.ndarray:
    return np.random.default_rng([seed, who, 9]).integers(0, 256, SRC_SIZE, dtype=np.uint8)


def imm_of(who: int, r: int) -> int:
    return ((who + 1) << 16) | (r % VALUES)


def round_plan(seed: int, who: int, r: int) -> dict:
    """Operations of sender ``who`` in round ``r``, into half r % 2 of the
    peer's region (offsets relative to that half)."""
    rng = np.random.default_rng([seed, who, r])
    imm = imm_of(who, r)
    ops: list[tuple] = []
    placements: list[tuple[int, int, int]] = []
    msgs: list[bytes] = []
    count = 0
    cursor = 0

    def slot(n: int) -> int | None:
        nonlocal cursor
        do = cursor + int(rng.integers(0, 64))
        if do + n > HALF:
            return None
        cursor = do + n
        return do

    for k in range(int(rng.integers(32, 97))):
        u = rng.random()
        if u < 0.6:
            c = rng.random()
            n = (0 if c < 0.02 else int(rng.integers(1, 512)) if c < 0.6
                 else int(rng.integers(512, 16 * KIB)) if c < 0.95
                 else int(rng.integers(16 * KIB, 128 * KIB + 1)))
            do = slot(n)
            if do is not None:
                so = int(rng.integers(0, SRC_SIZE - n + 1))
                ops.append(("write", so, do, n))
                placements.append((do, so, n))
                count += 1
                continue
        elif u < 0.8:
            ps = int(rng.choice([64, 1000, 4096]))
            npages = int(rng.integers(1, 17))
            ds = ps + int(rng.integers(0, 16))
            ss = ps + int(rng.integers(0, 16))
            base = slot(npages * ds)
            if base is not None:
                sp = rng.integers(0, (SRC_SIZE - ps) // ss + 1, npages).astype(np.int64)
                dp = rng.permutation(npages).astype(np.int64)
                ops.append(("paged", sp, dp, ps, ss, ds, base))
                placements += [(base + int(d) * ds, int(s) * ss, ps) for s, d in zip(sp, dp)]
                count += npages
                continue
        elif u >= 0.95:
            m = b"m%d:%d:" % (r, k) + rng.integers(0, 256, int(rng.integers(0, 512)),
                                                    dtype=np.uint8).tobytes()
            ops.append(("send", m))
            msgs.append(m)
            continue
        ops.append(("imm",))
        count += 1
    return {"ops": ops, "placements": placements, "msgs": msgs, "count": count, "imm": imm,
            "bytes": sum(p[2] for p in placements)}


# -------------------------------------------------------------------- child

def child_main(conn, me: int, seed: int, provider: str, shared) -> None:
    os.chdir(tempfile.gettempdir())
    try:
        asyncio.run(_child(conn, me, seed, provider, shared))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


async def _pipe(conn, timeout: float | None) -> Any:
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError("nothing from the parent")
    return conn.recv()


async def _child(conn, me: int, seed: int, provider: str, shared) -> None:
    peer = 1 - me
    nics = None if provider == "shm" else ["lo"]
    async with aiotransfer.TransferEngine(provider, nics=nics) as engine:
        rx = np.zeros(2 * HALF, np.uint8)
        rmr = engine.register(rx)
        smr = engine.register(source(seed, me))
        peer_src = source(seed, peer)
        conn.send(("ready", engine.address, rmr.descriptor))
        kind, peer_addr, peer_desc = await _pipe(conn, STEP_TIMEOUT)
        assert kind == "peer", kind
        dst = aiotransfer.RemoteRegion.from_bytes(peer_desc)
        stop = asyncio.Event()
        acked = -1
        ack_event = asyncio.Event()
        msgs_in: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        msg_event = asyncio.Event()
        totals = {"rounds_sent": 0, "rounds_checked": 0, "ops": 0, "bytes": 0}

        async def dispatcher() -> None:
            """The only recv() caller: acks for the sender, data for the receiver."""
            nonlocal acked
            while True:
                m = await engine.recv()
                if m.startswith(b"ack "):
                    acked = max(acked, int(m[4:]))
                    ack_event.set()
                else:
                    msgs_in[int(m[1:m.index(b":")])][m] += 1
                    msg_event.set()

        async def sender() -> None:
            r = 0
            while not stop.is_set():
                while acked < r - 2:
                    ack_event.clear()
                    await asyncio.wait_for(ack_event.wait(), STEP_TIMEOUT)
                p = round_plan(seed, me, r)
                off = (r % 2) * HALF
                futs = []
                for op in p["ops"]:
                    if op[0] == "write":
                        _, so, do, n = op
                        futs.append(engine.write(smr, dst, length=n, src_offset=so,
                                                 dst_offset=off + do, imm=p["imm"]))
                    elif op[0] == "paged":
                        _, sp, dp, ps, ss, ds, base = op
                        futs.append(engine.write_paged(smr, sp, dst, dp, page_size=ps,
                                                       src_stride=ss, dst_stride=ds,
                                                       dst_offset=off + base, imm=p["imm"]))
                    elif op[0] == "imm":
                        futs.append(engine.write_imm(dst, p["imm"]))
                    else:
                        futs.append(engine.send(peer_addr, op[1]))
                await asyncio.wait_for(asyncio.gather(*futs), STEP_TIMEOUT)
                totals["rounds_sent"] += 1
                totals["ops"] += len(futs)
                totals["bytes"] += p["bytes"]
                shared[me * 4 + 0] = totals["ops"]
                shared[me * 4 + 1] = totals["bytes"]
                r += 1

        async def receiver() -> None:
            r = 0
            while True:
                p = round_plan(seed, peer, r)
                await engine.expect_imm(p["imm"], p["count"], timeout=STEP_TIMEOUT)
                want = collections.Counter(p["msgs"])
                deadline = time.monotonic() + STEP_TIMEOUT
                while msgs_in[r] != want:
                    if msgs_in[r] - want or time.monotonic() > deadline:
                        raise AssertionError(f"round {r}: messages {msgs_in[r]} != {want}")
                    msg_event.clear()
                    await asyncio.wait_for(msg_event.wait(), STEP_TIMEOUT)
                del msgs_in[r]
                off = (r % 2) * HALF
                half = rx[off:off + HALF]
                exp = np.zeros(HALF, np.uint8)
                for do, so, n in p["placements"]:
                    exp[do:do + n] = peer_src[so:so + n]
                if not np.array_equal(half, exp):
                    bad = np.flatnonzero(half != exp)
                    raise AssertionError(f"round {r}: {bad.size} bytes differ, first at "
                                         f"{int(bad[0])}")
                half[:] = 0
                await engine.send(peer_addr, b"ack %d" % r)
                totals["rounds_checked"] += 1
                shared[me * 4 + 2] = totals["rounds_checked"]
                r += 1

        async def watch_parent() -> None:
            kind, *_ = await _pipe(conn, None)
            assert kind == "stop", kind
            stop.set()

        tasks = [asyncio.create_task(t()) for t in (dispatcher, receiver, watch_parent)]
        send_task = asyncio.create_task(sender())
        try:
            done, _ = await asyncio.wait([send_task, *tasks[:2]],
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()         # an error in any of them ends the run
            # stopped: let the peer check our last rounds
            await asyncio.sleep(0)
            deadline = time.monotonic() + STEP_TIMEOUT
            while acked < totals["rounds_sent"] - 1 and time.monotonic() < deadline:
                ack_event.clear()
                try:
                    await asyncio.wait_for(ack_event.wait(), 1)
                except TimeoutError:
                    pass
            conn.send(("stopped", dict(totals, acked=acked + 1)))
            # keep receiving until the parent says both are done
            kind, *_ = await _pipe(conn, STEP_TIMEOUT)
            assert kind == "bye", kind
            leftover = [v for v in range(VALUES)
                        if engine.imm_counter(imm_of(peer, v)).value]
            conn.send(("result", {"leftover_imm_values": leftover,
                                  "rounds_checked": totals["rounds_checked"],
                                  "stats": engine.stats()}))
        finally:
            for t in tasks + [send_task]:
                t.cancel()
            await asyncio.gather(*tasks, send_task, return_exceptions=True)


# ------------------------------------------------------------------- parent

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _recv(conn, what: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"timed out waiting for {what!r}")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"child failed:\n{msg[1]}")
    if msg[0] != what:
        raise RuntimeError(f"expected {what!r}, got {msg!r:.200}")
    return msg[1:]


def run(minutes: float = 10.0, *, interval: float = 10.0, warmup: float = 60.0,
        window: float = 60.0, provider: str = "tcp", seed: int = 1, verbose: bool = True
        ) -> dict:
    ctx = multiprocessing.get_context("spawn")
    shared = ctx.Array("q", 8, lock=False)
    procs, conns = [], []
    samples: list[dict] = []
    say = print if verbose else (lambda *a, **k: None)
    try:
        for me in range(2):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=child_main, args=(child, me, seed, provider, shared),
                            daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        ready = [_recv(c, "ready", STEP_TIMEOUT) for c in conns]
        for me, c in enumerate(conns):
            c.send(("peer", ready[1 - me][0], ready[1 - me][1]))
        pids = [p.pid for p in procs]
        t0 = time.monotonic()
        end = t0 + minutes * 60
        last_ops = last_bytes = 0
        last_t = t0
        last_cpu = sum(cpu_s(p) for p in pids)
        say(f"{'t (s)':>6} {'RSS A (KiB)':>12} {'RSS B (KiB)':>12} {'fds A':>6} {'fds B':>6} "
            f"{'ops/s':>9} {'MB/s':>8} {'ops/cpu-s':>10} {'load':>5} {'rounds':>8}")
        next_t = t0 + interval
        while True:
            for c in conns:        # a child that failed says so at once
                if c.poll(0):
                    _recv(c, "nothing", 0)
            now = time.monotonic()
            if now < next_t:
                time.sleep(min(0.2, next_t - now))
                continue
            ops = shared[0] + shared[4]
            nbytes = shared[1] + shared[5]
            dt = now - last_t
            cpu = sum(cpu_s(p) for p in pids)
            s = {"t": round(now - t0, 2), "rss_kib": [rss_kib(p) for p in pids],
                 "fds": [nfds(p) for p in pids],
                 "ops_per_s": (ops - last_ops) / dt, "mb_per_s": (nbytes - last_bytes) / dt / 1e6,
                 # operations per CPU-second of the two processes: what other
                 # load on the machine does not change
                 "ops_per_cpu_s": (ops - last_ops) / max(cpu - last_cpu, 1e-9),
                 "cpu_share": (cpu - last_cpu) / dt, "loadavg": loadavg(),
                 "rounds_checked": shared[2] + shared[6]}
            samples.append(s)
            say(f"{s['t']:6.0f} {s['rss_kib'][0]:12,} {s['rss_kib'][1]:12,} {s['fds'][0]:6} "
                f"{s['fds'][1]:6} {s['ops_per_s']:9,.0f} {s['mb_per_s']:8.1f} "
                f"{s['ops_per_cpu_s']:10,.0f} {s['loadavg']:5.2f} {s['rounds_checked']:8,}")
            last_ops, last_bytes, last_t, last_cpu = ops, nbytes, now, cpu
            next_t += interval
            if now >= end - 1e-6 or next_t > end + interval / 2:
                break
        for c in conns:
            c.send(("stop",))
        stopped = [_recv(c, "stopped", 2 * STEP_TIMEOUT)[0] for c in conns]
        for c in conns:
            c.send(("bye",))
        results = [_recv(c, "result", STEP_TIMEOUT)[0] for c in conns]
        for p in procs:
            p.join(30)
        exitcodes = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        for c in conns:
            c.close()

    def span(lo: float, hi: float) -> list[dict]:
        return [s for s in samples if lo < s["t"] <= hi + 1e-6]

    first = span(warmup, warmup + window)
    last = span(samples[-1]["t"] - window, samples[-1]["t"])
    problems = []
    if not first or not last or samples[-1]["t"] < warmup + 2 * window - 1e-6:
        problems.append("run too short for the comparison (need warmup + 2 windows)")
        verdict = {}
    else:
        def mean(xs):
            return statistics.fmean(xs)
        verdict = {"first_window": [first[0]["t"], first[-1]["t"]],
                   "last_window": [last[0]["t"], last[-1]["t"]]}
        for k in range(2):
            who = "AB"[k]
            for key, name in (("rss_kib", "rss"), ("fds", "fds")):
                a = mean([s[key][k] for s in first])
                b = mean([s[key][k] for s in last])
                g = b / a - 1
                verdict[f"{name}_{who}_growth"] = round(g, 4)
                verdict[f"{name}_{who}_first"] = round(a, 1)
                verdict[f"{name}_{who}_last"] = round(b, 1)
                if g >= 0.05:
                    problems.append(f"{name} of {who} grew {g * 100:.1f}% ({a:.0f} -> {b:.0f})")
        a = mean([s["ops_per_s"] for s in first])
        b = mean([s["ops_per_s"] for s in last])
        verdict.update(ops_per_s_first=round(a), ops_per_s_last=round(b),
                       throughput_ratio=round(b / a, 3))
        if b < 0.9 * a:
            problems.append(f"throughput fell to {b / a:.2f}x ({a:.0f} -> {b:.0f} ops/s)")
        ca = mean([s["ops_per_cpu_s"] for s in first])
        cb = mean([s["ops_per_cpu_s"] for s in last])
        verdict.update(ops_per_cpu_s_first=round(ca), ops_per_cpu_s_last=round(cb),
                       cpu_efficiency_ratio=round(cb / ca, 3),
                       loadavg_first=round(mean([s["loadavg"] for s in first]), 2),
                       loadavg_last=round(mean([s["loadavg"] for s in last]), 2))
    for k, r in enumerate(results):
        if r["leftover_imm_values"]:
            problems.append(f"{'AB'[k]}: immediates left over for values "
                            f"{r['leftover_imm_values'][:10]}")
    for k, st_ in enumerate(stopped):
        if st_["acked"] != st_["rounds_sent"]:
            problems.append(f"{'AB'[k]}: {st_['rounds_sent']} rounds sent, "
                            f"{st_['acked']} checked by the peer")
    problems += [f"{'AB'[k]} exited with {c}" for k, c in enumerate(exitcodes) if c != 0]
    return {"minutes": minutes, "interval_s": interval, "warmup_s": warmup, "window_s": window,
            "provider": provider, "seed": seed, "samples": samples, "verdict": verdict,
            "totals": stopped, "rounds_checked": [r["rounds_checked"] for r in results],
            "provider_errors": [sum(x["errors"] for x in r["stats"]) for r in results],
            "problems": problems,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["samples"]
    t = [x["t"] / 60 for x in s]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for k, who in enumerate("AB"):
        ax[0].plot(t, [x["rss_kib"][k] / 1024 for x in s], label=f"process {who}")
        ax[1].plot(t, [x["fds"][k] for x in s], label=f"process {who}")
    ax[2].plot(t, [x["ops_per_s"] for x in s], color="k", label="operations/s")
    if s and "ops_per_cpu_s" in s[0]:
        ax[2].plot(t, [x["ops_per_cpu_s"] for x in s], color="tab:green",
                   label="operations per CPU-second")
        ax[2].legend(loc="lower right")
    ax[0].set_ylabel("VmRSS (MiB)")
    ax[1].set_ylabel("open fds")
    ax[2].set_ylabel("operations (both)")
    ax[2].set_xlabel("minutes")
    v = result["verdict"]
    for a in ax:
        a.axvspan(0, result["warmup_s"] / 60, color="0.9", label="_warm-up")
        for w in (v.get("first_window"), v.get("last_window")):
            if w:   # the compared windows
                a.axvspan((w[0] - result["interval_s"]) / 60, w[1] / 60, color="tab:green",
                          alpha=0.08)
        a.grid(alpha=0.3)
    ax[0].legend(loc="lower right")
    ax[0].set_ylim(0, 1.2 * max(max(x["rss_kib"]) for x in s) / 1024)
    ax[1].set_ylim(0, 1.2 * max(max(x["fds"]) for x in s))
    ax[2].set_ylim(bottom=0)
    fig.suptitle(f"soak, {result['provider']}, {result['minutes']:g} min: throughput "
                 f"x{v.get('throughput_ratio', float('nan'))}, RSS "
                 f"{v.get('rss_A_growth', 0) * 100:+.1f}% / {v.get('rss_B_growth', 0) * 100:+.1f}%")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds not compared")
    ap.add_argument("--window", type=float, default=60.0,
                    help="seconds compared at the start (after warm-up) and at the end")
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=str(HERE / "results" / "soak.json"))
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "img" / "soak.png"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.minutes, interval=args.interval, warmup=args.warmup, window=args.window,
            provider=args.provider, seed=args.seed)
    v = r["verdict"]
    print()
    if v:
        print(f"first window {v['first_window']} s vs last window {v['last_window']} s:")
        for who in "AB":
            print(f"  process {who}: RSS {v[f'rss_{who}_first']:,.0f} -> "
                  f"{v[f'rss_{who}_last']:,.0f} KiB ({v[f'rss_{who}_growth'] * 100:+.2f}%), "
                  f"fds {v[f'fds_{who}_first']:.1f} -> {v[f'fds_{who}_last']:.1f} "
                  f"({v[f'fds_{who}_growth'] * 100:+.2f}%)")
        print(f"  throughput {v['ops_per_s_first']:,} -> {v['ops_per_s_last']:,} ops/s "
              f"(x{v['throughput_ratio']}); per CPU-second of the two processes "
              f"{v['ops_per_cpu_s_first']:,} -> {v['ops_per_cpu_s_last']:,} "
              f"(x{v['cpu_efficiency_ratio']}); machine load average "
              f"{v['loadavg_first']} -> {v['loadavg_last']}")
    print(f"  rounds checked {r['rounds_checked']}, provider errors {r['provider_errors']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    if not args.no_plot and args.plot:
        plot(r, args.plot)
    if r["problems"]:
        print("FAILED:")
        for p in r["problems"]:
            print("  " + p)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
