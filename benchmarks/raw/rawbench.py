"""Sweep CLI of the raw libfabric reference benchmark (fi_rawbench.c).

The program and its driver live in the package: aiotransfer/bench/fi_rawbench.c
and aiotransfer/bench/raw.py (``run_raw()`` compiles the program on demand
into ~/.cache/aiotransfer, starts the server and the client as two separate
processes on this host and returns the client's JSON result as a dict; see
its docstring for the result keys and the throughput definitions).  This
script re-exports ``run_raw``, ``build`` and ``RawBenchError`` and runs a
small sweep::

    python3 benchmarks/raw/rawbench.py                       # all providers
    python3 benchmarks/raw/rawbench.py -p shm -p "tcp;ofi_rxm" --modes bw,lat
    python3 benchmarks/raw/rawbench.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from aiotransfer.bench.common import wait_quiet  # noqa: E402
from aiotransfer.bench.raw import PROVIDERS, RawBenchError, build, run_raw  # noqa: E402


# ---------------------------------------------------------------------------
# sweep


def default_iters(mode: str, size: int, provider: str = "") -> int:
    """Short runs: ~128 MiB per bandwidth point (less for slow providers)."""
    slow = provider.startswith("udp") or provider == "sockets"
    if mode == "lat":
        return 500 if slow else 2000
    if mode in ("rate",) or size <= 4096:
        return 5000 if slow else 20000
    budget = (32 if slow else 128) << 20
    return int(min(20000, max(20, budget // max(size, 1))))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


_HEADER = (f"{'provider':<12} {'mode':<6} {'size':>9} {'win':>4} {'DC':>2} {'iters':>6} "
           f"{'GB/s e2e':>8} {'GB/s rx':>8} {'GB/s tx':>8} {'Mop/s e2e':>9} {'Mop/s rx':>8} "
           f"{'lat50us':>8} {'lat99us':>8} "
           f"{'cpu_cl':>7} {'cpu_sv':>7} {'ok':>3}")


def format_row(r: dict) -> str:
    dc = "y" if r.get("delivery_complete") else "n"
    if "error_text" in r:
        return (f"{r['provider']:<12} {r['mode']:<6} {r['size']:>9} {r['window']:>4} {dc:>2} "
                f"FAILED: {r['error_text']}")
    size = r["size"] if r["mode"] != "paged" else f"{r['pages']}x{r['size']}"
    return (f"{r['provider']:<12} {r['mode']:<6} {size!s:>9} {r['window']:>4} {dc:>2} "
            f"{r['iters']:>6} {_fmt(r['gbps_e2e'], '.3f'):>8} {_fmt(r['gbps_recv'], '.3f'):>8} "
            f"{_fmt(r['gbps_send'], '.3f'):>8} "
            f"{_fmt(r['mops_e2e'], '.4f'):>9} {_fmt(r['mops'], '.4f'):>8} "
            f"{_fmt(r['lat_us_median'], '.2f'):>8} "
            f"{_fmt(r['lat_us_p99'], '.2f'):>8} {_fmt(r['cpu_us_per_op_client'], '.2f'):>7} "
            f"{_fmt(r['cpu_us_per_op_server'], '.2f'):>7} {'yes' if r['verified'] else 'NO':>3}")


def print_table(rows: Iterable[dict], out=sys.stdout) -> None:
    print(_HEADER, file=out)
    print("-" * len(_HEADER), file=out)
    for r in rows:
        print(format_row(r), file=out)


def best_of(runs: list) -> dict:
    """The best successful run (max e2e Mop/s, or min median latency)."""
    good = [r for r in runs if "error_text" not in r and r.get("verified")]
    if not good:
        return dict(runs[-1])
    if good[0]["mode"] == "lat":
        return dict(min(good, key=lambda r: r["lat_us_median"]))
    return dict(max(good, key=lambda r: r["mops_e2e"] or 0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--provider", action="append",
                    help=f"provider (repeatable; default: {', '.join(PROVIDERS)})")
    ap.add_argument("--modes", default="bw,rate,lat,paged")
    ap.add_argument("--sizes", default="4096,65536,1048576,16777216",
                    help="sizes for bw mode (bytes)")
    ap.add_argument("--rate-size", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=None, help="override iteration counts")
    ap.add_argument("--no-dc", action="store_true", help="default completion instead of "
                    "FI_DELIVERY_COMPLETE")
    ap.add_argument("--both-dc", action="store_true", help="run with and without FI_DELIVERY_COMPLETE")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each point N times and keep the best (max e2e rate, min median "
                         "latency); the machine is shared, so best-of-N is the steadier figure")
    ap.add_argument("--progress", default="manual", choices=("manual", "auto", "unspec"))
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SEC",
                    help="before each run wait up to SEC seconds for the CPUs to be >=90%% idle "
                         "(both processes busy-poll, so other load distorts the figures)")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args(argv)

    providers = args.provider or list(PROVIDERS)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    dcs = [True, False] if args.both_dc else [not args.no_dc]

    points = []
    for prov in providers:
        for dc in dcs:
            for mode in modes:
                if mode == "bw":
                    points += [(prov, "bw", s, args.window, dc, None) for s in sizes]
                elif mode == "rate":
                    points.append((prov, "rate", args.rate_size, args.window, dc, None))
                elif mode == "lat":
                    points.append((prov, "lat", 8, 1, dc, None))
                elif mode == "paged":
                    points.append((prov, "paged", args.page_size, args.window, dc, args.pages))
                else:
                    ap.error(f"unknown mode {mode}")

    build()
    results = []
    print(_HEADER)
    print("-" * len(_HEADER), flush=True)
    for prov, mode, size, window, dc, pages in points:
        iters = args.iters or default_iters(mode, size, prov)
        runs = []
        for _ in range(max(1, args.repeat)):
            idle = wait_quiet(args.wait_idle) if args.wait_idle > 0 else None
            try:
                runs.append(run_raw(prov, mode, size, window, iters, delivery_complete=dc,
                                    pages=pages, timeout=args.timeout, progress=args.progress))
                runs[-1]["idle_before"] = idle
            except RawBenchError as exc:
                runs.append({"provider": prov, "mode": mode, "size": size, "window": window,
                             "delivery_complete": dc, "error_text": str(exc).splitlines()[0]})
        r = best_of(runs)
        r["runs"] = len(runs)
        r["failed_runs"] = sum(1 for x in runs if "error_text" in x)
        results.append(r)
        print(format_row(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("verified") and not r.get("failed_runs") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
