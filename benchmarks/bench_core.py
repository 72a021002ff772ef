"""Core benchmark: aiotransfer against a raw C libfabric program, same run.

A thin entry point of the harness (aiotransfer.bench): for each provider, the
same modes, sizes, window and completion semantics (FI_DELIVERY_COMPLETE on
every write that carries bytes) are measured with the C reference
(aiotransfer/bench/fi_rawbench.c) and with aiotransfer, alternating, and
reported as ratios.  Medians over --repeat runs.

    python benchmarks/bench_core.py                        # shm and tcp, full sweep
    python benchmarks/bench_core.py -p shm --quick         # a short smoke
    python benchmarks/bench_core.py --json out.json --plot out.png

Targets (issue: core engine), on shm and tcp: bandwidth >= 0.95 of raw C
from 64 KiB to 16 MiB; paged 8 B pages >= 0.8 of raw C's rate; one awaitable
per write >= 300,000 writes/s on shm; 8 B ping-pong latency within 10 us.
The head-to-head sweep with the peer libraries is ``aiotransfer bench``.

Single writes are measured in three styles of application code (see
aiotransfer/bench/aio.py): ``pipeline`` (a deque of awaitables, the oldest
awaited when the window is full), ``await`` (a coroutine per window slot,
each awaiting its write) and ``write`` (a done-callback per future, the
window refilled when half of it completed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # numpy's BLAS threads spin otherwise
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiotransfer.bench import Backend, Point  # noqa: E402
from aiotransfer.bench.sweep import fmt_size, machine, reference_of, run_sweep  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
NAMES = {"tcp": "tcp;ofi_rxm", "udp": "udp;ofi_rxd", "shm": "shm", "sockets": "sockets"}
SHORT = {v: k for k, v in NAMES.items()}
UNITS = {"bw": "GB/s", "rate": "Mop/s", "lat": "us"}


SINGLE = ("pipeline", "write")          # styles of single writes, bandwidth
RATE = ("pipeline", "await", "write")    # ... and rate


def plan(providers: list[str], quick: bool) -> list[tuple[Point, list[str]]]:
    """(point, [raw backend, aiotransfer backends...]) per provider; the paged
    row pairs the C program's paged mode with write_paged (1024 pages per call)."""
    if quick:
        pts = [(Point("bw", 64 * KIB, 64, 2000), SINGLE), (Point("rate", 8, 64, 20000), RATE),
               (Point("rate", 8, 4096, 100000, pages=1024), ("paged",)),
               (Point("lat", 8, 1, 500), ("write",))]
    else:
        pts = []
        for size in (4 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB):
            total = 4 << 30 if size >= 64 * KIB else 256 * MIB   # 4 GiB: 0.3-1 s a run
            pts.append((Point("bw", size, 64 if size <= MIB else 16, max(200, total // size)),
                        SINGLE))
        pts += [(Point("rate", 8, 64, 100000), RATE),
                (Point("rate", 8, 4096, 1000000, pages=1024), ("paged",)),
                (Point("lat", 8, 1, 5000), ("write",))]
    out = []
    for prov in providers:
        for point, styles in pts:
            if prov == "udp" and point.mode == "bw":
                point = Point("bw", point.size, point.window, max(100, point.iters // 20))
            aio = [f"aiotransfer:{prov}" + ("" if st == "write" else f":{st}") for st in styles]
            out.append((point, [reference_of(aio[0])] + aio))
    return out


def table(doc: dict) -> tuple[str, list[dict]]:
    rows = {(r["backend"], r["mode"], r["size"], r["window"]): r for r in doc["rows"]}
    out = ["| provider | mode | size | window | raw C | aiotransfer | ratio | verified |",
           "|---|---|---|---|---|---|---|---|"]
    pairs = []
    for (spec, mode, size, window), aio in rows.items():
        b = Backend.parse(spec)
        if b.kind != "aiotransfer":
            continue
        raw = rows.get((reference_of(spec), mode, size, window))
        u = UNITS[mode]
        r_v, a_v = raw and raw["value"], aio["value"]
        if mode == "lat":
            ratio = f"+{a_v - r_v:.1f} us" if r_v is not None and a_v is not None else "-"
        else:
            ratio = f"{a_v / r_v:.2f}" if r_v and a_v is not None else "-"
        label = (f"paged ({aio['pages']} pages/call)" if b.style == "paged"
                 else mode if b.style == "write" else f"{mode}, {b.style}")
        ok = aio["verified"] and raw is not None and raw["verified"]
        out.append(f"| {NAMES[b.transport]} | {label} | {fmt_size(size)} | {window} | "
                   f"{'-' if r_v is None else f'{r_v:.3g} {u}'} | "
                   f"{'-' if a_v is None else f'{a_v:.3g} {u}'} | {ratio} | "
                   f"{'yes' if ok else 'NO'} |")
        pairs.append({"provider": NAMES[b.transport], "mode": mode, "style": b.style,
                      "size": size, "window": window, "raw": r_v, "aio": a_v,
                      "raw_runs": raw and raw["runs"], "aio_runs": aio["runs"], "verified": ok})
    return "\n".join(out), pairs


def plot(pairs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for prov in dict.fromkeys(p["provider"] for p in pairs):
        bw = [p for p in pairs if p["provider"] == prov and p["mode"] == "bw"]
        if not bw:
            continue
        styles = list(dict.fromkeys(p["style"] for p in bw))
        ref = [p for p in bw if p["style"] == styles[0]]
        ax.plot([p["size"] for p in ref], [p["raw"] for p in ref], "--o",
                label=f"raw C libfabric ({prov})")
        for st in styles:
            mine = [p for p in bw if p["style"] == st]
            ax.plot([p["size"] for p in mine], [p["aio"] for p in mine], "-s",
                    label=f"aiotransfer {st} ({prov})")
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
    ap.add_argument("--repeat", type=int, default=5, help="runs per point (median)")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--plot", help="write a PNG plot of bandwidth vs size here")
    a = ap.parse_args()
    providers = [SHORT.get(p, p) for p in (a.provider or ["shm", "tcp"])]
    t0 = time.time()
    points = plan(providers, a.quick)
    idle = [f"aiotransfer:{p}" for p in providers]
    selected = [s for _, specs in points for s in specs] + idle
    doc = run_sweep(points, selected, a.repeat, idle=idle, idle_seconds=5.0, timeout=300)
    m = machine()
    print(f"\nmachine: {m['host']} {m['arch']}, {m['cores']} cores, {m['os']}; "
          f"{time.time() - t0:.0f} s")
    for spec, reason in doc["unavailable"].items():
        print(f"{spec}: unavailable: {reason}")
    text, pairs = table(doc)
    print(text)
    idle_pct = {NAMES[s.split(":")[1]]: v for s, v in doc["idle_cpu_percent"].items()}
    print("\nidle engine (5 s, /proc/<pid>/stat): " +
          ", ".join(f"{p} {v:.2f}% of a core" for p, v in idle_pct.items() if v is not None))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": pairs, "idle_cpu_percent": idle_pct,
                                            "when": time.ctime(), "machine": m}, indent=1))
    if a.plot:
        plot(pairs, a.plot)
    return 0 if pairs and all(p["verified"] for p in pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
