"""Multi-NIC benchmark: does an engine with N NICs feel like one N-times faster NIC?

Two testbed hosts (network namespaces, aiotransfer.testbed) joined by four
links, each shaped with ``tc tbf`` to ``--rate`` Mbit/s (both directions).
A sender process on host 0 streams ``--size`` writes (each with an
immediate) into a receiver process on host 1, keeping ``--window`` writes in
flight, for ``--seconds`` after a warm-up; throughput counts bytes whose
(delivery-complete) completion arrived in the measured span.  After each
point the receiver checks that exactly one immediate per write arrived and
that every slot of its region holds the source bytes.

Configurations, all measured in the same run (medians over --repeat):
  1 NIC, 2 NICs, 4 NICs at --rate each; the slow link alone at --rate/2;
  2 unequal NICs (--rate + --rate/2).
Targets (issue: many NICs per engine): 2 NICs >= 1.9x and 4 NICs >= 3.6x
the 1-NIC figure; unequal links >= 0.9 of the sum.

    python benchmarks/bench_multinic.py                  # needs root
    python benchmarks/bench_multinic.py --rate 500 --repeat 1 --seconds 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import aiotransfer  # noqa: E402
from aiotransfer import testbed  # noqa: E402
from aiotransfer.progress import ProgressBar  # noqa: E402

MIB = 1 << 20
PROVIDER = "tcp;ofi_rxm"
IMM = 7


def _src(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


# ------------------------------------------------------------------ children

def receiver_main(conn, ns: str, nics: list[str], size: int, window: int) -> None:
    testbed.enter(ns)
    asyncio.run(_receiver(conn, nics, size, window))


async def _receiver(conn, nics: list[str], size: int, window: int) -> None:
    async with aiotransfer.TransferEngine(PROVIDER, nics=nics) as eng:
        dst = np.zeros(size * window, np.uint8)
        mr = eng.register(dst)
        conn.send(mr.descriptor)
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg is None:
                return
            n = msg
            problems = []
            try:
                await eng.expect_imm(IMM, n, timeout=60)
            except TimeoutError:
                problems.append(f"{eng.imm_counter(IMM).total} immediates of {n}")
            await asyncio.sleep(0.05)
            if eng.imm_counter(IMM).value:
                problems.append(f"{eng.imm_counter(IMM).value} extra immediates")
            src = _src(size)
            for i in range(min(n, window)):
                if not np.array_equal(dst[i * size:(i + 1) * size], src):
                    problems.append(f"slot {i} differs")
            dst[:] = 0
            conn.send(problems)


def sender_main(conn, ns: str, nics: list[str], size: int, window: int, seconds: float,
                warmup: float) -> None:
    testbed.enter(ns)
    asyncio.run(_sender(conn, nics, size, window, seconds, warmup))


async def _sender(conn, nics, size, window, seconds, warmup) -> None:
    async with aiotransfer.TransferEngine(PROVIDER, nics=nics) as eng:
        mr = eng.register(_src(size))
        conn.send("ready")
        while True:
            desc = await asyncio.to_thread(conn.recv)
            if desc is None:
                return
            before = [s["bytes_written"] for s in eng.stats()]
            done: list[float] = []
            posted = 0
            t_start = time.monotonic()
            t_end = t_start + warmup + seconds
            inflight: set = set()

            def post(slot: int) -> None:
                nonlocal posted
                f = eng.write(mr, desc, dst_offset=slot * size, imm=IMM)
                f.add_done_callback(lambda _f: done.append(time.monotonic()))
                inflight.add(f)
                posted += 1

            for slot in range(window):
                post(slot)
            slot = 0
            while inflight:
                fin, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for f in fin:
                    inflight.discard(f)
                    f.result()
                    if time.monotonic() < t_end:
                        post(slot)
                        slot = (slot + 1) % window
            t0 = t_start + warmup
            times = sorted(done)
            measured = [t for t in times if t >= t0]
            span = (measured[-1] - t0) if measured else 0.0
            gbps = len(measured) * size * 8 / span / 1e9 if span > 0 else 0.0
            per_nic = [s["bytes_written"] - b for s, b in zip(eng.stats(), before)]
            conn.send({"gbit_s": gbps, "writes": posted, "per_nic": per_nic})


# -------------------------------------------------------------------- parent

class Pair:
    """A receiver on host 1 and a sender on host 0, each with `n` NICs."""

    def __init__(self, tb: testbed.Testbed, n: int, size: int, window: int, seconds: float,
                 warmup: float, first: int = 0) -> None:
        ctx = multiprocessing.get_context("spawn")
        nics = [f"nic{i}" for i in range(first, first + n)]
        self.rc, rchild = ctx.Pipe()
        self.sc, schild = ctx.Pipe()
        self.rp = ctx.Process(target=receiver_main, daemon=True,
                              args=(rchild, tb.hosts[1].name, nics, size, window))
        self.sp = ctx.Process(target=sender_main, daemon=True,
                              args=(schild, tb.hosts[0].name, nics, size, window, seconds,
                                    warmup))
        self.rp.start()
        self.sp.start()
        if not self.rc.poll(60) or not self.sc.poll(60):
            self.close()
            raise RuntimeError("benchmark processes did not start")
        self.desc = self.rc.recv()
        assert self.sc.recv() == "ready"

    def run(self) -> dict:
        self.sc.send(self.desc)
        if not self.sc.poll(300):
            raise RuntimeError("sender did not report")
        res = self.sc.recv()
        self.rc.send(res["writes"])
        if not self.rc.poll(120):
            raise RuntimeError("receiver did not report")
        res["problems"] = self.rc.recv()
        return res

    def close(self) -> None:
        for c in (self.sc, self.rc):
            try:
                c.send(None)
            except OSError:
                pass
        for p in (self.sp, self.rp):
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


def shape(tb: testbed.Testbed, rates: list[float | None]) -> None:
    for k, r in enumerate(rates):
        for h in (0, 1):
            tb.shape(h, k, r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000, help="Mbit/s per link (default 1000)")
    ap.add_argument("--size", type=int, default=4 * MIB, help="bytes per write (default 4 MiB)")
    ap.add_argument("--window", type=int, default=8, help="writes in flight (default 8)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured span per point")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=str(HERE / "results" / "multinic.json"))
    ap.add_argument("--plot", default=str(HERE.parent / "docs" / "img" / "multinic.png"))
    args = ap.parse_args(argv)

    ok, why = testbed.available()
    if not ok:
        print(f"cannot build the testbed here: {why}", file=sys.stderr)
        return 2
    R = args.rate
    configs = [  # name, NIC count, first NIC, per-link rates (link k = nic k)
        ("1 NIC", 1, 0, [R, R, R, R]),
        ("2 NICs", 2, 0, [R, R, R, R]),
        ("4 NICs", 4, 0, [R, R, R, R]),
        ("slow link alone", 1, 1, [R, R / 2, R, R]),
        ("2 unequal NICs", 2, 0, [R, R / 2, R, R]),
    ]
    results: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    bar = ProgressBar(len(configs) * args.repeat, "multi-NIC benchmark", "points")
    with testbed.Testbed(hosts=2, nics=4) as tb:
        for _ in range(args.repeat):
            for name, n, first, rates in configs:
                shape(tb, rates)
                pair = Pair(tb, n, args.size, args.window, args.seconds, args.warmup, first)
                try:
                    results[name].append(pair.run())
                finally:
                    pair.close()
                bar.update(1)
    bar.close()

    med = {name: statistics.median(r["gbit_s"] for r in rs) for name, rs in results.items()}
    problems = [f"{name}: {p}" for name, rs in results.items() for r in rs for p in r["problems"]]
    one = med["1 NIC"]
    rows = [
        ("1 NIC", med["1 NIC"], R / 1000, None, None),
        ("2 NICs", med["2 NICs"], 2 * R / 1000, med["2 NICs"] / one, 1.9),
        ("4 NICs", med["4 NICs"], 4 * R / 1000, med["4 NICs"] / one, 3.6),
        ("slow link alone", med["slow link alone"], R / 2000, None, None),
        ("2 unequal NICs", med["2 unequal NICs"], 1.5 * R / 1000,
         med["2 unequal NICs"] / (1.5 * R / 1000), 0.9),
    ]
    print(f"\nlinks shaped to {R:g} Mbit/s (tc tbf, both directions); {args.size // MIB} MiB "
          f"writes, window {args.window}, {args.seconds:g} s per point, median of "
          f"{args.repeat}; provider {PROVIDER}")
    print(f"{'configuration':<18} {'Gbit/s':>8} {'nominal':>8} {'ratio':>7} {'target':>7}")
    for name, g, nominal, ratio, target in rows:
        rs = f"{ratio:.2f}" if ratio is not None else ""
        ts = f">={target}" if target is not None else ""
        print(f"{name:<18} {g:8.3f} {nominal:8.3f} {rs:>7} {ts:>7}")
    unequal_vs_measured = med["2 unequal NICs"] / (one + med["slow link alone"])
    print(f"2 unequal NICs vs the two links measured alone: {unequal_vs_measured:.2f}")
    shares = [statistics.median(r["per_nic"][k] / max(1, sum(r["per_nic"]))
                                for r in results["2 unequal NICs"]) for k in range(2)]
    print(f"byte shares on the unequal pair: fast {shares[0]:.2f}, slow {shares[1]:.2f} "
          f"(link speeds say {2 / 3:.2f}/{1 / 3:.2f})")
    if problems:
        print("VERIFICATION PROBLEMS:\n  " + "\n  ".join(problems))
    else:
        print("every point verified: one immediate per write, every slot's bytes right")

    out = {"machine": platform.node(), "cpus": os.cpu_count(), "rate_mbit": R,
           "size": args.size, "window": args.window, "seconds": args.seconds,
           "repeat": args.repeat, "median_gbit_s": med, "runs": results,
           "ratios": {"2/1": med["2 NICs"] / one, "4/1": med["4 NICs"] / one,
                      "unequal/nominal_sum": med["2 unequal NICs"] / (1.5 * R / 1000),
                      "unequal/measured_sum": unequal_vs_measured},
           "unequal_shares": shares, "problems": problems,
           "command": "python " + " ".join(sys.argv)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(rows, R, args.plot)
    return 1 if problems else 0


def _plot(rows, rate: float, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    names = [r[0] for r in rows]
    got = [r[1] for r in rows]
    nominal = [r[2] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, nominal, 0.4, label="sum of link rates", color="#cccccc")
    ax.bar(x + 0.2, got, 0.4, label="aiotransfer (measured)", color="#1f77b4")
    for xi, g, n in zip(x, got, nominal):
        ax.text(xi + 0.2, g, f"{g / n:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("Gbit/s")
    ax.set_title(f"One engine over several NICs (links shaped to {rate:g} Mbit/s)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
