"""Core benchmark: aiotransfer against a raw C libfabric program, same run.

A thin entry point of the harness (aiotransfer.bench): for each provider, the
same modes, sizes, window and completion semantics (FI_DELIVERY_COMPLETE on
every write that carries bytes) are measured with the C reference
(aiotransfer/bench/fi_rawbench.c) and with aiotransfer, alternating, and
reported as ratios.  Medians over --repeat runs; a bandwidth point of the
targets' range whose paired 90% interval still holds 0.95 after them gets
further rounds, up to --max-repeat (a sequential design: runs go where the
answer is open, and the interval, not a lucky median, decides when to stop).

    python benchmarks/bench_core.py                        # shm and tcp, full sweep
    python benchmarks/bench_core.py -p shm --quick         # a short smoke
    python benchmarks/bench_core.py --json out.json --plot out.png
    python benchmarks/bench_core.py --only bw --style pipeline --repeat 15 --max-repeat 40

Targets (issue: core engine), on shm and tcp: bandwidth >= 0.95 of raw C
from 64 KiB to 16 MiB; paged 8 B pages >= 0.8 of raw C's rate; one awaitable
per write >= 300,000 writes/s on shm; 8 B ping-pong latency within 10 us.
The head-to-head sweep with the peer libraries is ``aiotransfer bench``.

Single writes are measured in three styles of application code (see
aiotransfer/bench/aio.py): ``pipeline`` (a deque of awaitables, the oldest
awaited when the window is full), ``await`` (a coroutine per window slot,
each awaiting its write) and ``write`` (a done-callback per future, the
window refilled when half of it completed); ``--style`` may add
``pipeline-uvloop`` (the pipeline style on uvloop's event loop).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # numpy's BLAS threads spin otherwise
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiotransfer.bench import Backend, Point  # noqa: E402
from aiotransfer.bench.common import KIB, MIB, median_interval, paired_ratios  # noqa: E402
from aiotransfer.bench.sweep import (fmt_size, machine, metric_of, reference_of,  # noqa: E402
                                     run_sweep)

NAMES = {"tcp": "tcp;ofi_rxm", "udp": "udp;ofi_rxd", "shm": "shm", "sockets": "sockets"}
SHORT = {v: k for k, v in NAMES.items()}
UNITS = {"bw": "GB/s", "rate": "Mop/s", "lat": "us"}


BW_TARGET = 0.95                        # bandwidth >= 0.95x raw C ...
BW_RANGE = (64 * KIB, 16 * MIB)         # ... at the sizes in this range
PAGED_TARGET = 0.8                      # paged 8 B >= 0.8x raw C's rate
LAT_TARGET_US = 10.0                    # ping-pong within 10 us of raw C
RATE_TARGET = 300_000                   # writes/s on shm, one awaitable each
SINGLE = ("pipeline", "write")          # styles of single writes, bandwidth
RATE = ("pipeline", "await", "write")    # ... and rate
OPT_IN = ("pipeline-uvloop",)            # only when --style names them (pip install uvloop)
MODES = ("bw", "rate", "paged", "lat", "idle")   # --only


def plan(providers: list[str], quick: bool, only: tuple[str, ...] = MODES,
         styles: tuple[str, ...] = RATE) -> list[tuple[Point, list[str]]]:
    """(point, [raw backend, aiotransfer backends...]) per provider; the paged
    row pairs the C program's paged mode with write_paged (1024 pages per call).
    ``only``: the kinds of point to keep (MODES); ``styles``: the styles of
    single writes to keep (bandwidth and rate points)."""
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
        for point, kinds in pts:
            kind = "paged" if kinds == ("paged",) else point.mode
            if kind not in only:
                continue
            if kind in ("bw", "rate"):
                kinds = tuple(st for st in kinds + OPT_IN if st in styles)
                if not kinds:
                    continue
            if prov == "udp" and point.mode == "bw":
                point = Point("bw", point.size, point.window, max(100, point.iters // 20))
            aio = [f"aiotransfer:{prov}" + ("" if st == "write" else f":{st}") for st in kinds]
            out.append((point, [reference_of(aio[0])] + aio))
    return out


def bw_undecided(point: Point, runs: dict[str, list[dict]]) -> bool:
    """A bandwidth point of the target's range (64 KiB to 16 MiB) whose paired
    90% interval, for some aiotransfer style, still holds the 0.95 target:
    one more round of pairs narrows it (run_sweep's sequential rounds)."""
    if point.mode != "bw" or not BW_RANGE[0] <= point.size <= BW_RANGE[1]:
        return False
    ref = next((s for s in runs if Backend.parse(s).kind == "raw"), None)
    if ref is None:
        return False

    def values(spec: str) -> list:
        return [metric_of(point, r) if r.get("verified") else None for r in runs[spec]]

    for spec in runs:
        if spec == ref:
            continue
        p = _paired(values(ref), values(spec), point.mode)
        if p is None or p["n"] < 2 or p["lo"] < BW_TARGET < p["hi"]:
            return True
    return False


def pair_values(raw_runs: list, aio_runs: list, mode: str) -> list[float]:
    """The pairs of a point: aiotransfer/raw C per repeat (latency:
    aiotransfer - raw C in us), each repeat's two runs made back to back."""
    if mode == "lat":
        return [b - a for a, b in zip(raw_runs, aio_runs) if a is not None and b is not None]
    return paired_ratios(raw_runs, aio_runs)


def _paired(raw_runs: list, aio_runs: list, mode: str) -> dict | None:
    """Median and 90% interval of the pairs (pair_values)."""
    vals = pair_values(raw_runs, aio_runs, mode)
    if not vals:
        return None
    lo, hi, cov = median_interval(vals)
    return {"median": statistics.median(vals), "lo": lo, "hi": hi, "coverage": cov,
            "n": len(vals)}


def _fmt_paired(p: dict | None, mode: str) -> str:
    if p is None:
        return "-"
    if mode == "lat":
        return f"+{p['median']:.1f} us ({p['lo']:+.1f}..{p['hi']:+.1f}, n={p['n']})"
    return f"{p['median']:.2f} ({p['lo']:.2f}-{p['hi']:.2f}, n={p['n']})"


def table(doc: dict) -> tuple[str, list[dict]]:
    rows = {(r["backend"], r["mode"], r["size"], r["window"]): r for r in doc["rows"]}
    out = ["| provider | mode | size | window | raw C | aiotransfer | ratio | paired (interval) "
           "| verified |",
           "|---|---|---|---|---|---|---|---|---|"]
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
        paired = _paired(raw["runs"], aio["runs"], mode) if raw else None
        label = (f"paged ({aio['pages']} pages/call)" if b.style == "paged"
                 else mode if b.style == "write" else f"{mode}, {b.style}")
        ok = aio["verified"] and raw is not None and raw["verified"]
        out.append(f"| {NAMES[b.transport]} | {label} | {fmt_size(size)} | {window} | "
                   f"{'-' if r_v is None else f'{r_v:.3g} {u}'} | "
                   f"{'-' if a_v is None else f'{a_v:.3g} {u}'} | {ratio} | "
                   f"{_fmt_paired(paired, mode)} | {'yes' if ok else 'NO'} |")
        pairs.append({"provider": NAMES[b.transport], "mode": mode, "style": b.style,
                      "size": size, "window": window, "raw": r_v, "aio": a_v,
                      "paired": paired,
                      "raw_runs": raw and raw["runs"], "aio_runs": aio["runs"],
                      "raw_started_s": raw and raw.get("started_s"),
                      "aio_started_s": aio.get("started_s"), "verified": ok})
    return "\n".join(out), pairs


def targets(pairs: list[dict]) -> list[dict]:
    """The core-engine issue's targets, judged on the paired medians (rate: on
    aiotransfer's median) of the rows measured; a target with no row is left out."""
    def find(prov: str, mode: str, style: str) -> list[dict]:
        return [p for p in pairs if p["provider"] == NAMES[prov] and p["mode"] == mode
                and p["style"] == style and p["paired"] is not None]

    out = []
    for prov in ("shm", "tcp"):
        for style in SINGLE:
            bw = [p for p in find(prov, "bw", style)
                  if BW_RANGE[0] <= p["size"] <= BW_RANGE[1]]
            if bw:
                short = [p for p in bw if p["paired"]["median"] < BW_TARGET]
                out.append({
                    "target": f"{prov} bandwidth >= {BW_TARGET}x raw C, 64 KiB-16 MiB "
                              f"({style} style)",
                    "measured": ", ".join(f"{fmt_size(p['size'])} {p['paired']['median']:.3f}"
                                          for p in bw),
                    "met": not short,
                    "short": [fmt_size(p["size"]) for p in short]})
        paged = find(prov, "rate", "paged")
        if paged:
            q = paged[0]["paired"]["median"]
            out.append({"target": f"{prov} paged 8 B >= {PAGED_TARGET}x raw C's rate",
                        "measured": f"{q:.3f}", "met": q >= PAGED_TARGET, "short": []})
        lat = find(prov, "lat", "write")
        if lat:
            d = lat[0]["paired"]["median"]
            out.append({"target": f"{prov} 8 B ping-pong within {LAT_TARGET_US:g} us of raw C",
                        "measured": f"+{d:.1f} us", "met": d <= LAT_TARGET_US, "short": []})
    rate = [p for p in pairs if p["provider"] == "shm" and p["mode"] == "rate"
            and p["size"] == 8 and p["style"] != "paged" and p["aio"] is not None]
    if rate:
        best = max(rate, key=lambda p: p["aio"])
        out.append({"target": f"shm >= {RATE_TARGET:,} writes/s, one awaitable per write",
                    "measured": ", ".join(f"{p['style']} {p['aio'] * 1e6:,.0f}/s" for p in rate),
                    "met": best["aio"] * 1e6 >= RATE_TARGET, "short": []})
    return out


def plot(pairs: list[dict], path: str) -> None:
    """Two panels: bandwidth against size (medians), and the paired ratio
    aiotransfer/raw C with its 90% interval against the 0.95 target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for prov in dict.fromkeys(p["provider"] for p in pairs):
        bw = [p for p in pairs if p["provider"] == prov and p["mode"] == "bw"]
        if not bw:
            continue
        styles = list(dict.fromkeys(p["style"] for p in bw))
        ref = [p for p in bw if p["style"] == styles[0]]
        ax.plot([p["size"] for p in ref], [p["raw"] for p in ref], "--o",
                label=f"raw C libfabric ({prov})")
        for k, st in enumerate(styles):
            mine = [p for p in bw if p["style"] == st]
            ax.plot([p["size"] for p in mine], [p["aio"] for p in mine], "-s",
                    label=f"aiotransfer {st} ({prov})")
            got = [p for p in mine if p["paired"] is not None]
            if not got:
                continue
            # styles side by side at each size, so the intervals do not overlap
            xs = [p["size"] * 2 ** ((k - (len(styles) - 1) / 2) * 0.12) for p in got]
            med = [p["paired"]["median"] for p in got]
            err = [[m - p["paired"]["lo"] for m, p in zip(med, got)],
                   [p["paired"]["hi"] - m for m, p in zip(med, got)]]
            rx.errorbar(xs, med, yerr=err, fmt="-o" if prov.startswith("shm") else "-s",
                        capsize=3, label=f"{st} ({prov})")
    rx.axhline(BW_TARGET, color="red", linestyle=":", label=f"target {BW_TARGET}")
    rx.axhline(1.0, color="grey", linewidth=0.8)
    rx.axvspan(*BW_RANGE, color="green", alpha=0.06, label="target range")
    for axis, ylabel, title in (
            (ax, "GB/s, first post to last arrival (1e9 B/s)",
             "One-sided writes, window 64/16, FI_DELIVERY_COMPLETE, loopback"),
            (rx, "aiotransfer / raw C, paired median",
             "Paired ratio with its 90% interval (bars)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("write size (bytes)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--provider", action="append",
                    help="shm, tcp, sockets, udp (repeatable; default shm and tcp)")
    ap.add_argument("--quick", action="store_true", help="one short point per mode")
    ap.add_argument("--only", default=",".join(MODES),
                    help=f"kinds of point, comma-separated (default {','.join(MODES)})")
    ap.add_argument("--style", default=",".join(RATE),
                    help="styles of single writes for bw and rate points, comma-separated "
                         f"(default {','.join(RATE)}; bandwidth has {', '.join(SINGLE)}; "
                         f"opt-in: {', '.join(OPT_IN)}, both processes on uvloop)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per point (median)")
    ap.add_argument("--max-repeat", type=int, default=32,
                    help="bandwidth points of the target's range whose paired 90%% interval "
                         "still holds 0.95 get further rounds, up to this many in all "
                         "(default 32; --repeat or less: none)")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--plot", help="write a PNG plot of bandwidth vs size here")
    a = ap.parse_args(argv)
    providers = [SHORT.get(p, p) for p in (a.provider or ["shm", "tcp"])]
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    styles = tuple(x.strip() for x in a.style.split(",") if x.strip())
    for name, got, allowed in (("--only", only, MODES), ("--style", styles, RATE + OPT_IN)):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            ap.error(f"{name}: {', '.join(bad) or 'nothing'} not among {', '.join(allowed)}")
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    t0 = time.time()
    points = plan(providers, a.quick, only, styles)
    idle = [f"aiotransfer:{p}" for p in providers] if "idle" in only else []
    selected = [s for _, specs in points for s in specs] + idle
    doc = run_sweep(points, selected, a.repeat, idle=idle, idle_seconds=5.0, timeout=300,
                    undecided=bw_undecided, max_repeat=a.max_repeat)
    m = machine()
    print(f"\nmachine: {m['host']} {m['arch']}, {m['cores']} cores, {m['os']}; "
          f"{time.time() - t0:.0f} s")
    for spec, reason in doc["unavailable"].items():
        print(f"{spec}: unavailable: {reason}")
    text, pairs = table(doc)
    print(text)
    print("\nratio: median over median; paired: the median over the repeats of "
          "aiotransfer/raw C, each repeat's two runs back to back (latency: the difference), "
          "with its distribution-free 90% interval (all runs when fewer than 5) and the "
          f"number of pairs n (bandwidth, 64 KiB-16 MiB: {a.repeat} pairs, then more while "
          f"the interval holds {BW_TARGET}, up to {max(a.repeat, a.max_repeat)})")
    goals = targets(pairs)
    if goals:
        print("\ntargets (core-engine issue, on the paired medians):")
        for t in goals:
            verdict = "met" if t["met"] else f"MISSED ({', '.join(t['short'])})" \
                if t["short"] else "MISSED"
            print(f"  {t['target']}: {t['measured']}: {verdict}")
    idle_pct = {NAMES[s.split(":")[1]]: v for s, v in doc["idle_cpu_percent"].items()}
    if idle_pct:
        print("\nidle engine (5 s, /proc/<pid>/stat): " +
              ", ".join(f"{p} {v:.2f}% of a core" for p, v in idle_pct.items() if v is not None))
    if a.json:
        Path(a.json).write_text(json.dumps(
            {"rows": pairs, "targets": goals, "idle_cpu_percent": idle_pct,
             "repeat": a.repeat, "max_repeat": a.max_repeat, "when": time.ctime(),
             "machine": m}, indent=1))
    if a.plot:
        plot(pairs, a.plot)
    return 0 if pairs and all(p["verified"] for p in pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
