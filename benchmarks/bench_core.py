"""Core benchmark: aiotransfer against a raw C libfabric program, same run.

For each provider, the same modes, sizes, window and completion semantics
(FI_DELIVERY_COMPLETE on every write that carries bytes) are measured with
benchmarks/raw/fi_rawbench.c and with aiotransfer (benchmarks/aio_bench.py),
alternating, and reported as ratios.  Medians over --repeat runs.

    python benchmarks/bench_core.py                        # shm and tcp, full sweep
    python benchmarks/bench_core.py -p shm --quick         # a short smoke
    python benchmarks/bench_core.py --json out.json --plot out.png

Targets (issue: core engine), on shm and tcp: bandwidth >= 0.95 of raw C
from 64 KiB to 16 MiB; paged 8 B pages >= 0.8 of raw C's rate; one awaitable
per write >= 300,000 writes/s on shm; 8 B ping-pong latency within 10 us.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # numpy's BLAS threads spin otherwise

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "raw"))

from aio_bench import idle_cpu, run_aio  # noqa: E402
from rawbench import run_raw  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from aiotransfer.progress import ProgressBar  # noqa: E402

ALIASES = {"tcp": "tcp;ofi_rxm", "udp": "udp;ofi_rxd", "shm": "shm", "sockets": "sockets"}
KIB, MIB = 1 << 10, 1 << 20


def plan(quick: bool) -> list[tuple]:
    """(mode, size, window, iters, pages) points."""
    if quick:
        return [("bw", 64 * KIB, 64, 2000, None), ("rate", 8, 64, 20000, None),
                ("paged", 8, 4096, 100000, 1024), ("lat", 8, 1, 500, None)]
    pts = []
    for size in (4 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB):
        total = 1 << 30 if size >= 64 * KIB else 256 * MIB
        pts.append(("bw", size, 64 if size <= MIB else 16, max(200, total // size), None))
    pts.append(("rate", 8, 64, 100000, None))
    pts.append(("paged", 8, 4096, 1000000, 1024))
    pts.append(("lat", 8, 1, 5000, None))
    return pts


def metric(res: dict, mode: str) -> float | None:
    # end to end: the client's first measured post to the target's last
    # arrival (same host, same CLOCK_MONOTONIC); the target-only span is
    # unreliable on tcp, whose CQ can lag data placement by 100 ms
    if mode == "bw":
        return res.get("gbps_e2e")
    if mode in ("rate", "paged"):
        return res.get("mops_e2e")
    return res.get("lat_us_median")


def median_of(rs: list[dict], mode: str) -> float | None:
    vals = [metric(r, mode) for r in rs if metric(r, mode) is not None]
    return statistics.median(vals) if vals else None


def run(providers: list[str], quick: bool, repeat: int) -> list[dict]:
    pts = plan(quick)
    rows = []
    bar = ProgressBar(len(providers) * len(pts) * repeat * 2, "bench", unit="")
    for prov in providers:
        for mode, size, window, iters, pages in pts:
            if prov == "udp;ofi_rxd" and mode == "bw":
                iters = max(100, iters // 20)
            raw_rs, aio_rs = [], []
            for _ in range(repeat):
                raw_rs.append(run_raw(prov, mode, size, window, iters, delivery_complete=True,
                                      pages=pages, timeout=300))
                bar.update(1)
                aio_rs.append(run_aio(prov, mode, size, window, iters, pages=pages))
                bar.update(1)
            row = {"provider": prov, "mode": mode, "size": size, "window": window,
                   "iters": iters, "pages": pages,
                   "raw": median_of(raw_rs, mode), "aio": median_of(aio_rs, mode),
                   "raw_runs": [metric(r, mode) for r in raw_rs],
                   "aio_runs": [metric(r, mode) for r in aio_rs],
                   "verified": all(r.get("verified") for r in raw_rs + aio_rs)}
            if row["raw"] and row["aio"]:
                row["ratio"] = (row["raw"] / row["aio"] if mode == "lat"
                                else row["aio"] / row["raw"])
                if mode == "lat":
                    row["delta_us"] = row["aio"] - row["raw"]
            rows.append(row)
    bar.close()
    return rows


def fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB" if n >= KIB else f"{n} B"


def table(rows: list[dict]) -> str:
    out = ["| provider | mode | size | window | raw C | aiotransfer | ratio | verified |",
           "|---|---|---|---|---|---|---|---|"]
    units = {"bw": "GB/s", "rate": "Mop/s", "paged": "Mop/s", "lat": "us"}
    for r in rows:
        u = units[r["mode"]]
        raw = f"{r['raw']:.3g} {u}" if r["raw"] is not None else "-"
        aio = f"{r['aio']:.3g} {u}" if r["aio"] is not None else "-"
        if r["mode"] == "lat" and "delta_us" in r:
            ratio = f"+{r['delta_us']:.1f} us"
        else:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        mode = r["mode"] + (f" ({r['pages']} pages/call)" if r["pages"] else "")
        out.append(f"| {r['provider']} | {mode} | {fmt_size(r['size'])} | {r['window']} | "
                   f"{raw} | {aio} | {ratio} | {'yes' if r['verified'] else 'NO'} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for prov in dict.fromkeys(r["provider"] for r in rows):
        bw = [r for r in rows if r["provider"] == prov and r["mode"] == "bw"]
        if not bw:
            continue
        xs = [r["size"] for r in bw]
        ax.plot(xs, [r["raw"] for r in bw], "--o", label=f"raw C libfabric ({prov})")
        ax.plot(xs, [r["aio"] for r in bw], "-s", label=f"aiotransfer ({prov})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("write size (bytes)")
    ax.set_ylabel("GB/s, first post to last arrival (1e9 B/s)")
    ax.set_title("One-sided writes, window 64/16, FI_DELIVERY_COMPLETE, loopback")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--provider", action="append",
                    help="shm, tcp, sockets, udp (repeatable; default shm and tcp)")
    ap.add_argument("--quick", action="store_true", help="one short point per mode")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point (median)")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--plot", help="write a PNG plot of bandwidth vs size here")
    a = ap.parse_args()
    providers = [ALIASES.get(p, p) for p in (a.provider or ["shm", "tcp"])]
    t0 = time.time()
    rows = run(providers, a.quick, a.repeat)
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.platform()}; {time.time() - t0:.0f} s")
    print(table(rows))
    idle = {p: idle_cpu(p) for p in providers}
    print("\nidle engine (3 s, process CPU): " +
          ", ".join(f"{p} {v:.2f}% of a core" for p, v in idle.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "idle_cpu_percent": idle,
                                            "when": time.ctime(),
                                            "cores": os.cpu_count()}, indent=1))
    if a.plot:
        plot(rows, a.plot)
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
