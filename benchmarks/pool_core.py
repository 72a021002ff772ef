#!/usr/bin/env python3
"""Pool the pairs of several core benchmark runs of the same code.

``bench_core.py`` decides each target on one run: the paired median of up to
32 back-to-back pairs (raw C, then aiotransfer, or the other way round).  On
these shared 2-core VMs a slow spell of minutes can move one run's median by
more than a target's margin, so one run can miss a point that the code meets.
This script pools the pairs of every run given, point by point, and decides
each target on the pooled median's distribution-free interval (95% by
default): met when the whole interval is on the right side of the target,
missed when it is wholly on the wrong side, else open.  Each run's own
paired median is listed beside it.

Only runs of the same library code may be pooled; the script cannot check
that (the JSON holds no commit), so name the runs' files by their code.

    python benchmarks/pool_core.py benchmarks/results/history/*.json \\
        --plot docs/img/core_pooled.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_core, beside us

from bench_core import (BW_RANGE, BW_TARGET, LAT_TARGET_US, PAGED_TARGET,  # noqa: E402
                        RATE_TARGET, pair_values)

from aiotransfer.bench.common import KIB, MIB, median_interval  # noqa: E402


@dataclass
class Point:
    """One point of the core benchmark pooled over runs."""
    provider: str
    mode: str
    style: str
    size: int
    per_run: list[float | None] = field(default_factory=list)   # each run's paired median
    values: list[float] = field(default_factory=list)           # every pair, pooled
    per_run_aio: list[float | None] = field(default_factory=list)  # each run's aio median
    aio: list[float] = field(default_factory=list)              # every aio run, pooled


def load(path: str) -> dict:
    """A bench_core.py result document; ValueError naming the file if it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: no 'rows' list: not a bench_core.py result")
    for row in doc["rows"]:
        missing = {"provider", "mode", "style", "size", "raw_runs", "aio_runs"} - set(row)
        if missing:
            raise ValueError(f"{path}: a row lacks {', '.join(sorted(missing))}: "
                             "not a bench_core.py result (or one from before session 9)")
    return doc


def pool(docs: list[dict]) -> dict[tuple, Point]:
    """Every point of every run, pooled by (provider, mode, style, size)."""
    points: dict[tuple, Point] = {}
    for i, doc in enumerate(docs):
        for row in doc["rows"]:
            key = (row["provider"], row["mode"], row["style"], row["size"])
            p = points.setdefault(key, Point(*key))
            while len(p.per_run) < i:
                p.per_run.append(None)
                p.per_run_aio.append(None)
            vals = pair_values(row["raw_runs"], row["aio_runs"], row["mode"])
            aio = [v for v in row["aio_runs"] if v is not None]
            p.per_run.append(statistics.median(vals) if vals else None)
            p.per_run_aio.append(statistics.median(aio) if aio else None)
            p.values.extend(vals)
            p.aio.extend(aio)
    for p in points.values():
        while len(p.per_run) < len(docs):
            p.per_run.append(None)
            p.per_run_aio.append(None)
    return points


def verdict(lo: float, hi: float, target: float, higher_is_better: bool) -> str:
    """'met', 'missed' or 'open' for an interval against a target."""
    if higher_is_better:
        return "met" if lo >= target else "missed" if hi < target else "open"
    return "met" if hi <= target else "missed" if lo > target else "open"


def _bw_sizes(points) -> list[int]:
    """The bandwidth sizes of the targets' range that the runs measured."""
    return sorted({k[3] for k in points if k[1] == "bw" and BW_RANGE[0] <= k[3] <= BW_RANGE[1]})


def target_rows(points: dict[tuple, Point], level: float) -> list[dict]:
    """The core issue's targets, each point with its pooled interval and verdict."""
    out = []

    def add(p: Point | None, what: str, target: float, higher: bool, unit: str,
            scale: float = 0.0) -> None:
        """scale 0: the pairs (ratio or difference); else aiotransfer's own
        values times scale (an absolute target)."""
        if p is None:
            return
        vals = [v * scale for v in p.aio] if scale else p.values
        per_run = ([v * scale if v is not None else None for v in p.per_run_aio] if scale
                   else p.per_run)
        if not vals:
            return
        lo, hi, cov = median_interval(vals, level)
        out.append({"target": what, "provider": p.provider, "style": p.style, "size": p.size,
                    "per_run": per_run, "n": len(vals), "median": statistics.median(vals),
                    "lo": lo, "hi": hi, "coverage": cov, "unit": unit,
                    "verdict": verdict(lo, hi, target, higher)})

    for prov in ("shm", "tcp;ofi_rxm"):
        short = prov.split(";")[0]
        for style in ("pipeline", "write"):
            for size in _bw_sizes(points):
                add(points.get((prov, "bw", style, size)),
                    f"{short} bandwidth >= {BW_TARGET}x raw C ({style})", BW_TARGET, True, "x")
        add(points.get((prov, "rate", "paged", 8)),
            f"{short} paged 8 B >= {PAGED_TARGET}x raw C's rate", PAGED_TARGET, True, "x")
        add(points.get((prov, "lat", "write", 8)),
            f"{short} 8 B ping-pong within {LAT_TARGET_US:g} us of raw C", LAT_TARGET_US,
            False, "us")
    add(points.get(("shm", "rate", "pipeline", 8)),
        f"shm >= {RATE_TARGET:,} writes/s, one awaitable each (pipeline)", RATE_TARGET, True,
        "/s", scale=1e6)
    return out


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "/s":
        return f"{v:,.0f}"
    if unit == "us":
        return f"{v:+.1f}"
    return f"{v:.3f}"


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB" if n >= KIB else f"{n} B"


def markdown(rows: list[dict], names: list[str], level: float) -> str:
    head = ("| target | point | " + " | ".join(names) + f" | pooled n | pooled median "
            f"({level:.0%} interval) | verdict |")
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for r in rows:
        point = f"{r['style']} {_size(r['size'])}" if "bandwidth" in r["target"] else ""
        runs = " | ".join(_fmt(v, r["unit"]) for v in r["per_run"])
        lines.append(f"| {r['target']} | {point} | {runs} | {r['n']} | "
                     f"{_fmt(r['median'], r['unit'])} ({_fmt(r['lo'], r['unit'])} to "
                     f"{_fmt(r['hi'], r['unit'])}) | {r['verdict']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, level: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = [r for r in rows if "bandwidth" in r["target"]]
    sizes = sorted({r["size"] for r in bw})
    provs = [p for p in ("shm", "tcp") if any(r["target"].startswith(p) for r in bw)]
    fig, axes = plt.subplots(1, len(provs), figsize=(6 * len(provs), 4.2), squeeze=False)
    for ax, prov in zip(axes[0], provs):
        for j, (style, colour) in enumerate((("pipeline", "tab:blue"), ("write", "tab:orange"))):
            sel = [r for r in bw if r["target"].startswith(prov) and r["style"] == style]
            xs = [sizes.index(r["size"]) + (j - 0.5) * 0.25 for r in sel]
            for x, r in zip(xs, sel):
                runs = [v for v in r["per_run"] if v is not None]
                ax.scatter([x] * len(runs), runs, s=10, color=colour, alpha=0.45)
            ax.errorbar(xs, [r["median"] for r in sel],
                        yerr=[[r["median"] - r["lo"] for r in sel],
                              [r["hi"] - r["median"] for r in sel]],
                        fmt="s", color=colour, capsize=4, label=f"{style}: pooled median, "
                        f"{level:.0%} interval (dots: each run's)")
        ax.axhline(BW_TARGET, color="red", lw=1, ls="--", label=f"target {BW_TARGET}")
        ax.set_xticks(range(len(sizes)), [_size(s) for s in sizes])
        ax.set_title(f"{prov}: aiotransfer / raw C, pairs of all runs pooled")
        ax.set_ylabel("paired ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench_core.py result files of the same code")
    ap.add_argument("--level", type=float, default=0.95,
                    help="coverage of the pooled median's interval (default 0.95)")
    ap.add_argument("--plot", help="write the bandwidth points as a PNG here")
    ap.add_argument("--json", help="write the pooled targets as JSON here")
    a = ap.parse_args(argv)
    if not 0 < a.level < 1:
        ap.error(f"--level must be in (0, 1), got {a.level}")
    try:
        docs = [load(p) for p in a.runs]
    except ValueError as exc:
        ap.error(str(exc))
    names = [os.path.splitext(os.path.basename(p))[0] for p in a.runs]
    rows = target_rows(pool(docs), a.level)
    print(markdown(rows, names, a.level))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": names, "level": a.level, "targets": rows}, f, indent=1)
    if a.plot:
        plot(rows, a.plot, a.level)
    return 0 if all(r["verdict"] == "met" for r in rows if r["style"] != "write") else 1


if __name__ == "__main__":
    sys.exit(main())
