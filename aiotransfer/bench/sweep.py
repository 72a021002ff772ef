"""``aiotransfer bench``: the head-to-head sweep.

Bandwidth by size (4 KiB .. 64 MiB), operation rate (8 B and 4 KiB) with CPU
per operation, 8-byte write+immediate ping-pong latency and the idle CPU of
an open engine, for every backend that can run here (aiotransfer over shm and
tcp in its three styles, the raw C libfabric reference, Mooncake Transfer
Engine over tcp, NIXL over UCX tcp and shared memory), all in the same run,
points repeated ``--repeat`` times with the backends alternating; each figure
is the median.  Prints the tables with the ratios (aiotransfer against the raw
C reference and against each peer), writes JSON and a PNG plot.

    aiotransfer bench                          # full sweep (about 25 min on a shared 2-core VM)
    aiotransfer bench --quick                  # a short one
    aiotransfer bench --backends aiotransfer:shm,raw:shm --sizes 64K,1M --only bw
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..progress import ProgressBar
from .backends import Backend
from .common import GIB, KIB, MIB, BenchError, Point, Unavailable, wait_quiet

SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB]
RATE_SIZES = [8, 4 * KIB]
BW_BACKENDS = ["raw:shm", "aiotransfer:shm", "aiotransfer:shm:pipeline", "aiotransfer:shm:paged",
               "nixl:shm",
               "raw:tcp", "aiotransfer:tcp", "aiotransfer:tcp:pipeline", "aiotransfer:tcp:paged",
               "mooncake:tcp", "nixl:tcp"]
RATE_BACKENDS = ["raw:shm", "raw:shm:paged", "aiotransfer:shm", "aiotransfer:shm:await",
                 "aiotransfer:shm:pipeline",
                 "aiotransfer:shm:paged", "nixl:shm",
                 "raw:tcp", "raw:tcp:paged", "aiotransfer:tcp", "aiotransfer:tcp:await",
                 "aiotransfer:tcp:pipeline",
                 "aiotransfer:tcp:paged", "mooncake:tcp", "nixl:tcp"]
LAT_BACKENDS = ["raw:shm", "aiotransfer:shm", "nixl:shm",
                "raw:tcp", "aiotransfer:tcp", "mooncake:tcp", "nixl:tcp"]
IDLE_BACKENDS = ["aiotransfer:shm", "aiotransfer:tcp", "mooncake:tcp", "nixl:shm", "nixl:tcp",
                 "nixl:shm:pthread", "nixl:tcp:pthread"]
PEERS = ("mooncake", "nixl")
METRICS = ("bw", "rate", "lat", "idle")

#: the targets of the issue, checked on every sweep: (name, kind, args)
TARGETS = [
    ("aiotransfer tcp >= 3x Mooncake tcp bandwidth, 1 MiB and above",
     "bw_ratio", ("tcp", "mooncake:tcp", 3.0, MIB)),
    ("aiotransfer tcp >= 2x NIXL UCX tcp bandwidth, 1 MiB and above",
     "bw_ratio", ("tcp", "nixl:tcp", 2.0, MIB)),
    ("aiotransfer shm >= NIXL UCX shm bandwidth at every size, 4 KiB to 64 MiB",
     "bw_ratio", ("shm", "nixl:shm", 1.0, 0)),
    ("idle open engine <= 2% of a core", "idle", (2.0,)),
]


# -------------------------------------------------------------------- plan

def window_for(size: int) -> int:
    return 64 if size <= MIB else 16 if size <= 16 * MIB else 8


def bw_point(size: int, scale: float = 1.0) -> Point:
    window = window_for(size)
    total = (GIB if size >= 64 * KIB else 256 * MIB) * scale
    return Point("bw", size, window, int(min(50000, max(4 * window, total // size))))


def plan(metrics: list[str], sizes: list[int], scale: float) -> list[tuple[Point, list[str]]]:
    pts: list[tuple[Point, list[str]]] = []
    if "bw" in metrics:
        pts += [(bw_point(s, scale), BW_BACKENDS) for s in sizes]
    if "rate" in metrics:
        pts += [(Point("rate", s, 64, max(1000, int(50000 * scale))), RATE_BACKENDS)
                for s in RATE_SIZES]
    if "lat" in metrics:
        pts.append((Point("lat", 8, 1, max(200, int(5000 * scale))), LAT_BACKENDS))
    return pts


# --------------------------------------------------------------------- run

def metric_of(point: Point, res: dict) -> float | None:
    if point.mode == "bw":
        return res.get("gbps_e2e")
    if point.mode == "rate":
        return res.get("mops_e2e")
    return res.get("lat_us_median")


def _median(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def run_sweep(points: list[tuple[Point, list[str]]], selected: list[str], repeat: int, *,
              idle: list[str], idle_seconds: float, timeout: float,
              progress: bool = True, wait_idle: float = 0.0,
              checkpoint: Callable[[dict], None] | None = None,
              undecided: Callable[[Point, dict[str, list[dict]]], bool] | None = None,
              max_repeat: int = 0) -> dict:
    """Run every point with every selected backend (alternating, `repeat`
    times, the order reversed on every other repeat), then the idle
    measurements; returns the result document (``checkpoint(doc)`` gets the
    document so far after every point).

    ``undecided(point, runs)``: after the `repeat` rounds of a point, further
    rounds follow while it returns True (``runs``: each backend's results so
    far), up to `max_repeat` rounds in all: a sequential design that spends
    runs only where the answer is still open."""
    backends = {s: Backend.parse(s) for s in dict.fromkeys(
        [b for _, bs in points for b in bs] + idle) if s in selected}
    unavailable = {}
    for spec, b in backends.items():
        reason = b.unavailable()
        if reason:
            unavailable[spec] = reason
    runnable = [s for s in backends if s not in unavailable]
    total = sum(repeat * len([b for b in bs if b in runnable]) for _, bs in points)
    total += len([s for s in idle if s in runnable])
    bar = ProgressBar(total, "bench", stream=sys.stderr if progress else open(os.devnull, "w"))
    rows = []
    t0 = time.monotonic()
    for point, specs in points:
        specs = [s for s in specs if s in runnable]
        runs: dict[str, list] = {s: [] for s in specs}
        r = 0
        while r < repeat or (undecided is not None and r < max_repeat and undecided(point, runs)):
            if r >= repeat:
                bar.total += len(specs)
            # order reversed every other repeat (A B, B A, ...): a back-to-back
            # pair favours neither side by going first
            for spec in (specs if r % 2 == 0 else specs[::-1]):
                bar.label = f"{point.mode} {fmt_size(point.size)} {spec}"
                quiet = wait_quiet(wait_idle, interval=0.2) if wait_idle > 0 else None
                started = round(time.monotonic() - t0, 2)
                try:
                    runs[spec].append(backends[spec].run(point, timeout=timeout))
                except (BenchError, Unavailable) as exc:
                    runs[spec].append({"error": str(exc), "verified": False})
                runs[spec][-1]["idle_before"] = quiet
                runs[spec][-1]["started_s"] = started   # (when: modes of the VM last seconds)
                bar.update(1)
            r += 1
        for spec in specs:
            rows.append(_row(point, backends[spec], runs[spec]))
        if checkpoint:
            checkpoint({"rows": rows, "idle_cpu_percent": {}, "unavailable": unavailable,
                        "labels": {s: b.label for s, b in backends.items()}, "partial": True})
    idle_pct: dict[str, float | None] = {}
    for spec in idle:
        if spec not in runnable:
            continue
        bar.label = f"idle {spec}"
        if wait_idle > 0:
            wait_quiet(wait_idle, interval=0.2)
        try:
            idle_pct[spec] = backends[spec].idle(idle_seconds)
        except BenchError as exc:
            idle_pct[spec] = None
            unavailable[spec + " (idle)"] = str(exc).splitlines()[0]
        bar.update(1)
    bar.close()
    versions: dict = {}
    for spec in runnable:
        versions.update(backends[spec].versions())
    return {"rows": rows, "idle_cpu_percent": idle_pct, "unavailable": unavailable,
            "versions": versions, "labels": {s: b.label for s, b in backends.items()}}


def _row(point: Point, backend: Backend, runs: list[dict]) -> dict:
    vals = [metric_of(point, r) for r in runs if r.get("verified")]
    row = {"mode": point.mode, "size": point.size, "window": point.window,
           "iters": point.iters, "pages": point.pages, "backend": backend.spec, "label": backend.label,
           "value": _median(vals), "runs": [metric_of(point, r) for r in runs],
           "started_s": [r.get("started_s") for r in runs],
           "verified": all(r.get("verified") for r in runs),
           "errors": [r["error"] for r in runs if "error" in r]}
    row["min"] = min(vals) if vals else None
    row["max"] = max(vals) if vals else None
    if point.mode == "lat":
        row["p99"] = _median([r.get("lat_us_p99") for r in runs])
    else:
        row["cpu_us_per_op"] = _median([
            (r.get("cpu_us_per_op_client") or 0) + (r.get("cpu_us_per_op_server") or 0)
            for r in runs if r.get("cpu_us_per_op_client") is not None])
        row["cpu_us_per_op_client"] = _median([r.get("cpu_us_per_op_client") for r in runs])
        row["cpu_us_per_op_server"] = _median([r.get("cpu_us_per_op_server") for r in runs])
        row["end"] = next((r["end"] for r in runs if "end" in r), None)
    row["detail"] = runs
    return row


# ------------------------------------------------------------------ report

def fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB" if n >= KIB else f"{n} B"


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _find(rows: list[dict], mode: str, spec: str, size: int) -> dict | None:
    return next((r for r in rows if r["mode"] == mode and r["backend"] == spec
                 and r["size"] == size), None)


def _cell(row: dict | None, doc: dict, spec: str) -> str:
    if row is None:
        reason = doc["unavailable"].get(spec)
        return "n/a" if reason else "-"
    if row["value"] is None:
        return "failed" if row["errors"] else "-"
    return _num(row["value"]) + ("" if row["verified"] else " (unverified)")


def reference_of(spec: str) -> str | None:
    """The raw C run an aiotransfer backend is compared with."""
    b = Backend.parse(spec)
    if b.kind != "aiotransfer":
        return None
    return f"raw:{b.transport}" + (":paged" if b.style == "paged" else "")


def _ratio(a: dict | None, b: dict | None, lower_better: bool = False) -> float | None:
    if not a or not b or a["value"] is None or b["value"] is None or not b["value"]:
        return None
    return b["value"] / a["value"] if lower_better else a["value"] / b["value"]


def _present(doc: dict, specs: list[str]) -> list[str]:
    seen = {r["backend"] for r in doc["rows"]}
    return [s for s in specs if s in seen or s in doc["unavailable"]]


def _md(title: str, head: list[str], body: list[list[str]]) -> list[str]:
    """A markdown table with its title line."""
    return ([f"{title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cells) + " |" for cells in body] + [""])


def _ratio_cell(a: dict | None, b: dict | None) -> str:
    q = _ratio(a, b)
    return "-" if q is None else f"{q:.2f}"


def bw_tables(doc: dict) -> list[str]:
    out = []
    rows = [r for r in doc["rows"] if r["mode"] == "bw"]
    sizes = sorted({r["size"] for r in rows})
    for transport, title in (("shm", "one host, shared memory"), ("tcp", "tcp over loopback")):
        specs = _present(doc, [s for s in BW_BACKENDS if s.split(":")[1] == transport])
        if not specs or not sizes:
            continue
        mine = f"aiotransfer:{transport}"
        others = [s for s in specs if s.split(":")[0] in PEERS or s == f"raw:{transport}"]
        head = ["size", "window"] + [doc["labels"].get(s, s) for s in specs] + \
               [f"aiotransfer / {doc['labels'].get(s, s)}" for s in others]
        body = []
        for size in sizes:
            cells = [fmt_size(size), str(next(r["window"] for r in rows if r["size"] == size))]
            cells += [_cell(_find(rows, "bw", s, size), doc, s) for s in specs]
            cells += [_ratio_cell(_find(rows, "bw", mine, size), _find(rows, "bw", s, size))
                      for s in others]
            body.append(cells)
        out += _md(f"Bandwidth, {title} (GB/s, median of the runs):", head, body)
    return out


def rate_table(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r["mode"] == "rate"]
    if not rows:
        return []
    sizes = sorted({r["size"] for r in rows})
    head = ["backend"] + [f"{fmt_size(s)} Mop/s" for s in sizes] + \
           [f"{fmt_size(s)} CPU us/op" for s in sizes] + [f"{fmt_size(s)} vs raw C" for s in sizes]
    body = []
    for spec in _present(doc, RATE_BACKENDS):
        found = [_find(rows, "rate", spec, s) for s in sizes]
        ref = reference_of(spec)
        body.append([doc["labels"].get(spec, spec)]
                    + [_cell(r, doc, spec) for r in found]
                    + [_num(r.get("cpu_us_per_op")) if r else "-" for r in found]
                    + [_ratio_cell(r, _find(rows, "rate", ref, s)) if ref else "-"
                       for s, r in zip(sizes, found)])
    return _md("Operation rate (window 64) and CPU per operation (client + server process "
               "CPU over the measured phase):", head, body)


def lat_table(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r["mode"] == "lat"]
    if not rows:
        return []
    body = []
    for spec in _present(doc, LAT_BACKENDS):
        r = _find(rows, "lat", spec, 8)
        ref = reference_of(spec)
        rr = _find(rows, "lat", ref, 8) if ref else None
        delta = (f"+{r['value'] - rr['value']:.1f} us"
                 if r and rr and r["value"] is not None and rr["value"] is not None else "-")
        body.append([doc["labels"].get(spec, spec), _cell(r, doc, spec),
                     _num(r.get("p99")) if r else "-", delta])
    return _md("8-byte write with immediate (notification), ping-pong, one-way = RTT/2:",
               ["backend", "median us", "p99 us", "vs raw C"], body)


def idle_table(doc: dict) -> list[str]:
    idle = doc["idle_cpu_percent"]
    if not idle:
        return []
    body = []
    for spec, v in idle.items():
        label = doc["labels"].get(spec, spec)
        if spec.startswith("nixl:") and spec.endswith(":pthread"):
            label += " (NIXL default: progress thread)"
        body.append([label, "-" if v is None else f"{v:.2f}"])
    return _md("Idle open engine (process CPU over the idle interval, % of one core):",
               ["backend", "% of a core"], body)


def check_targets(doc: dict) -> list[dict]:
    rows = [r for r in doc["rows"] if r["mode"] == "bw"]
    out = []
    for name, kind, args in TARGETS:
        item = {"target": name, "met": None, "measured": "not measured"}
        if kind == "bw_ratio":
            transport, peer, need, min_size = args
            ratios, ceiling = {}, {}
            for size in sorted({r["size"] for r in rows if r["size"] >= min_size}):
                q = _ratio(_find(rows, "bw", f"aiotransfer:{transport}", size),
                           _find(rows, "bw", peer, size))
                if q is not None:
                    ratios[size] = q
                    # what the raw C libfabric program reaches against the same peer
                    ceiling[size] = _ratio(_find(rows, "bw", f"raw:{transport}", size),
                                           _find(rows, "bw", peer, size))
            if ratios:
                short = {s: q for s, q in ratios.items() if q < need}
                item["met"] = not short
                item["measured"] = ", ".join(
                    f"{fmt_size(s)} {q:.2f}x" + (f" (raw C {ceiling[s]:.2f}x)"
                                                 if ceiling[s] is not None else "")
                    for s, q in ratios.items())
                item["ratios"] = {str(s): q for s, q in ratios.items()}
                item["raw_c_ratios"] = {str(s): q for s, q in ceiling.items()}
                if short:
                    worst = min(short, key=short.get)
                    item["shortfall"] = (f"missed at {len(short)} of {len(ratios)} sizes; worst "
                                         f"{fmt_size(worst)}: {short[worst]:.2f}x of {need:g}x "
                                         f"({(1 - short[worst] / need) * 100:.0f}% short)")
            elif peer in doc["unavailable"]:
                item["measured"] = f"{peer} unavailable: {doc['unavailable'][peer]}"
        elif kind == "idle":
            (limit,) = args
            vals = {s: v for s, v in doc["idle_cpu_percent"].items()
                    if s.startswith("aiotransfer") and v is not None}
            if vals:
                item["met"] = all(v <= limit for v in vals.values())
                item["measured"] = ", ".join(f"{s.split(':')[1]} {v:.2f}%" for s, v in vals.items())
        out.append(item)
    return out


def targets_table(targets: list[dict]) -> list[str]:
    body = []
    for t in targets:
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        if t.get("shortfall"):
            met += f" ({t['shortfall']})"
        body.append([t["target"], t["measured"], met])
    return _md("Targets (same machine, same run):", ["target", "measured", "met?"], body)


def report(doc: dict) -> str:
    lines = bw_tables(doc) + rate_table(doc) + lat_table(doc) + idle_table(doc)
    lines += targets_table(doc["targets"])
    if doc["unavailable"]:
        lines.append("Not measured:\n")
        lines += [f"- {spec}: unavailable: {reason}" for spec, reason in doc["unavailable"].items()]
        lines.append("")
    failed = [r for r in doc["rows"] if r["errors"]]
    if failed:
        lines.append("Failed runs:\n")
        lines += [f"- {r['mode']} {fmt_size(r['size'])} {r['backend']}: "
                  f"{len(r['errors'])} of {len(r['runs'])}: {r['errors'][0].splitlines()[0]}"
                  for r in failed]
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in doc["rows"] if r["mode"] == "bw" and r["value"] is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    colors = {"aiotransfer": "tab:blue", "aiotransfer:paged": "tab:cyan", "raw": "black",
              "mooncake": "tab:orange", "nixl": "tab:green"}
    for spec in dict.fromkeys(r["backend"] for r in rows):
        b = Backend.parse(spec)
        pts = sorted((r["size"], r["value"]) for r in rows if r["backend"] == spec)
        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                "-o" if b.transport == "shm" else "--s", markersize=4,
                color=colors.get(f"{b.kind}:{b.style}", colors[b.kind]),
                label=doc["labels"].get(spec, spec))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ticks = sorted({r["size"] for r in rows})
    ax.set_xticks(ticks, [fmt_size(t) for t in ticks], rotation=30)
    ax.set_xlabel("write size")
    ax.set_ylabel("GB/s, first post to last arrival (1e9 B/s)")
    ax.set_title("One-sided writes, two processes on one host (solid: shared memory, "
                 "dashed: tcp)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------- machine

def machine() -> dict:
    info = {"host": platform.node(), "arch": platform.machine(), "cores": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        if os.path.exists("/etc/debian_version"):
            info["debian"] = Path("/etc/debian_version").read_text().strip()
    except (OSError, StopIteration):
        pass
    if shutil.which("pkg-config"):
        v = subprocess.run(["pkg-config", "--modversion", "libfabric"], capture_output=True,
                           text=True).stdout.strip()
        if v:
            info["libfabric"] = v
    return info


# ------------------------------------------------------------------ main

def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KIB, "M": MIB, "G": GIB}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiotransfer bench",
                                 description="Head-to-head sweep: aiotransfer against the raw C "
                                             "libfabric reference and peer libraries.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--quick", action="store_true",
                    help="a short sweep: 64 KiB and 1 MiB, 1/8 of the bytes, repeat 1")
    ap.add_argument("--repeat", type=int, default=None, help="runs per point (default 3)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated kind:transport[:style] (default: all; see "
                         "aiotransfer.bench.backends)")
    ap.add_argument("--no-peers", action="store_true", help="leave out Mooncake and NIXL")
    ap.add_argument("--sizes", default=None, help="bandwidth sizes, e.g. 4K,64K,1M,64M")
    ap.add_argument("--only", default=",".join(METRICS),
                    help=f"metrics to measure, of {','.join(METRICS)} (default: all)")
    ap.add_argument("--scale", type=float, default=None,
                    help="multiply the bytes/operations of every point (default 1, --quick 1/8)")
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SEC",
                    help="before each run wait up to SEC seconds for the CPUs to be >=90%% "
                         "idle (other load distorts the figures; default: do not wait)")
    ap.add_argument("--json", default="bench.json", help="result file (default: %(default)s)")
    ap.add_argument("--plot", default=None,
                    help="bandwidth plot, PNG (default: bench_bw.png; '' for none; needs "
                         "matplotlib)")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="measure nothing: print the tables of an earlier result file "
                         "(and write --plot/--markdown from it)")
    a = ap.parse_args(argv)
    if a.report:
        return _rerender(a)

    metrics = [m.strip() for m in a.only.split(",") if m.strip()]
    for m in metrics:
        if m not in METRICS:
            ap.error(f"--only: unknown metric {m!r}")
    every = list(dict.fromkeys(BW_BACKENDS + RATE_BACKENDS + LAT_BACKENDS + IDLE_BACKENDS))
    try:
        selected = ([Backend.parse(s.strip()).spec for s in a.backends.split(",") if s.strip()]
                    if a.backends else every)
    except ValueError as exc:
        ap.error(str(exc))
    if a.no_peers:
        selected = [s for s in selected if s.split(":")[0] not in PEERS]
    sizes = ([parse_size(s) for s in a.sizes.split(",") if s.strip()] if a.sizes
             else [64 * KIB, MIB] if a.quick else SIZES)
    scale = a.scale if a.scale is not None else (1 / 8 if a.quick else 1.0)
    repeat = a.repeat if a.repeat is not None else (1 if a.quick else 3)
    points = plan(metrics, sizes, scale)
    idle = [s for s in IDLE_BACKENDS if s in selected] if "idle" in metrics else []

    def checkpoint(part: dict) -> None:
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(part, indent=1, default=str))

    t0 = time.time()
    doc = run_sweep(points, selected, repeat, idle=idle, idle_seconds=a.idle_seconds,
                    timeout=a.timeout, progress=not a.no_progress, wait_idle=a.wait_idle,
                    checkpoint=checkpoint)
    wall = time.time() - t0
    doc["targets"] = check_targets(doc)
    doc.update({"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_seconds": round(wall),
                "command": "aiotransfer bench " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]),
                "repeat": repeat, "machine": machine()})
    text = report(doc)
    m = doc["machine"]
    print(f"\nmachine: {m.get('cpu', m['arch'])}, {m['cores']} cores, {m['os']}, libfabric "
          f"{m.get('libfabric', '?')}; versions: "
          + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
          + f"; {repeat} run(s) per point; {wall:.0f} s\n")
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1, default=str))
        print(f"JSON: {a.json}")
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    plot_path = "bench_bw.png" if a.plot is None else a.plot
    if plot_path and "bw" in metrics:
        try:
            plot(doc, plot_path)
            print(f"plot: {plot_path}")
        except ImportError:
            print("plot: not written: matplotlib is not installed "
                  "(pip install 'aiotransfer[bench]')", file=sys.stderr)
    bad = [r for r in doc["rows"] if not r["verified"]]
    return 1 if bad else 0


def _rerender(a: argparse.Namespace) -> int:
    doc = json.loads(Path(a.report).read_text())
    doc["targets"] = check_targets(doc)
    text = report(doc)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if a.plot:
        plot(doc, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
