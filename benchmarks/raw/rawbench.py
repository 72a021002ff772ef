"""Driver for the raw libfabric reference benchmark (fi_rawbench.c).

``run_raw()`` builds ``build/fi_rawbench`` if needed (plain ``make`` in this
directory), starts the server and the client as two separate processes on
this host (out-of-band TCP on 127.0.0.1 only; IP providers are pinned to the
IPv4 loopback domain ``lo``) and returns the client's JSON result as a dict.

Run as a script for a small sweep::

    python3 benchmarks/raw/rawbench.py                       # all providers
    python3 benchmarks/raw/rawbench.py -p shm -p "tcp;ofi_rxm" --modes bw,lat
    python3 benchmarks/raw/rawbench.py --json results.json

Result keys (see fi_rawbench.c): provider, mode, size, window, iters, warmup,
pages, delivery_complete, gbps_recv, gbps_send, gbps_e2e, mops, mops_recv,
mops_send, mops_e2e, lat_us_median, lat_us_p99, cpu_us_per_op_client,
cpu_us_per_op_server, verified, error, plus diagnostics (mr_mode, flags...).

Throughput definitions (1 GB/s = 1e9 B/s, n = measured writes):
  *_recv  (n-1) writes over first..last measured arrival seen in the target's
          CQ ("at the receiver"); "mops" is mops_recv.
  *_send  n writes from the client's first post to its last completion
  *_e2e   n writes from the client's first post to the target's last arrival
          (both processes share CLOCK_MONOTONIC).
e2e is the sturdier figure: with tcp the target's CQ can lag data placement
and then drain in a burst, which makes *_recv over-report (seen up to ~100x
on this machine in single runs without FI_DELIVERY_COMPLETE).
cpu_us_per_op_server covers the same e2e interval.  N/A values are None.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "build"
BINARY = BUILD_DIR / "fi_rawbench"
SOURCES = (HERE / "fi_rawbench.c", HERE / "Makefile")

PROVIDERS = ("tcp;ofi_rxm", "shm", "udp;ofi_rxd", "sockets")
MODES = ("bw", "rate", "lat", "paged")


class RawBenchError(RuntimeError):
    """The benchmark failed (non-zero exit, no result, or verification failure)."""

    def __init__(self, msg: str, result: Optional[dict] = None):
        super().__init__(msg)
        self.result = result


def build(force: bool = False) -> Path:
    """Compile fi_rawbench into build/ unless it is already up to date."""
    if not force and BINARY.exists():
        mtime = BINARY.stat().st_mtime
        if all(src.stat().st_mtime <= mtime for src in SOURCES):
            return BINARY
    cmd = ["make", "-C", str(HERE), "-s"]
    if force:
        cmd.append("-B")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not BINARY.exists():
        raise RawBenchError(f"building fi_rawbench failed:\n{proc.stdout}{proc.stderr}")
    return BINARY


def _read_port(proc: subprocess.Popen, deadline: float) -> int:
    """Read the server's first stdout line, 'PORT <n>'."""
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RawBenchError("server did not report its port in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 256)
        if not chunk:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RawBenchError(f"server exited before reporting its port: {err}")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("PORT "):
        raise RawBenchError(f"unexpected server output: {line!r}")
    return int(line.split()[1])


def run_raw(
    provider: str,
    mode: str,
    size: int,
    window: int,
    iters: int,
    delivery_complete: bool = True,
    domain: Optional[str] = None,
    pages: Optional[int] = None,
    *,
    warmup: Optional[int] = None,
    inject: bool = False,
    thread_safe: bool = False,
    progress: str = "manual",
    timeout: float = 60.0,
    check: bool = True,
    verbose: bool = False,
) -> dict:
    """Run one server/client pair of fi_rawbench and return the client's JSON result.

    provider: libfabric provider name, e.g. "tcp;ofi_rxm", "shm", "udp;ofi_rxd", "sockets".
    mode: "bw", "rate", "lat", "paged" (or the diagnostic "dcprobe").
    size: bytes per write (per page in paged mode).
    window: writes kept in flight (forced to 1 in lat mode).
    iters: measured writes (lat: measured round trips).
    delivery_complete: add FI_DELIVERY_COMPLETE to every write.
    domain: libfabric domain; default "lo" for IP providers.
    pages: number of pages for mode "paged" (default 64).
    warmup: warm-up writes (default max(10% of iters, 16); lat: max(10%, 10)).
    inject: use FI_INJECT when size <= the provider's inject_size.
    thread_safe: request FI_THREAD_SAFE instead of FI_THREAD_DOMAIN.
    progress: data progress to request: "manual" (default; every provider here
        supports it, and the sockets provider's auto-progress thread stalls on
        long streams), "auto", or "unspec" (provider default).
    timeout: seconds before both processes give up (they exit with code 3).
    check: raise RawBenchError unless both sides exit 0 and the data verified.

    The returned dict also carries "client_rc", "server_rc" and, when not
    empty, "server_stderr"/"client_stderr".
    """
    binary = build()
    tmo = max(1, int(timeout))
    server_cmd = [str(binary), "-r", "server", "-P", "0", "-T", str(tmo)]
    client_cmd = [
        str(binary), "-r", "client", "-p", provider, "-m", mode,
        "-s", str(int(size)), "-w", str(int(window)), "-n", str(int(iters)),
        "-T", str(tmo),
    ]
    if domain:
        client_cmd += ["-d", domain]
    if pages is not None:
        client_cmd += ["-N", str(int(pages))]
    if warmup is not None:
        client_cmd += ["-W", str(int(warmup))]
    if delivery_complete:
        client_cmd.append("-D")
    if inject:
        client_cmd.append("-i")
    if thread_safe:
        client_cmd.append("-t")
    if progress != "manual":
        client_cmd += ["-g", progress]
    if verbose:
        server_cmd.append("-v")
        client_cmd.append("-v")

    deadline = time.monotonic() + tmo + 10
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = _read_port(server, time.monotonic() + 10)
        client_cmd[3:3] = ["-P", str(port)]
        try:
            client = subprocess.run(
                client_cmd, capture_output=True, text=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired as exc:
            raise RawBenchError(f"client timed out: {' '.join(client_cmd)}") from exc
        try:
            s_out, s_err = server.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise RawBenchError("server did not exit") from exc
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    s_err = s_err.decode(errors="replace")
    result: Optional[dict] = None
    for line in reversed(client.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            result = json.loads(line)
            break
    if result is None:
        raise RawBenchError(
            f"no result from client (rc={client.returncode}, server rc={server.returncode})\n"
            f"client: {client.stderr.strip()}\nserver: {s_err.strip()}"
        )
    result["client_rc"] = client.returncode
    result["server_rc"] = server.returncode
    if s_err.strip():
        result["server_stderr"] = s_err.strip()
    if client.stderr.strip():
        result["client_stderr"] = client.stderr.strip()
    if check and (client.returncode or server.returncode or not result.get("verified")):
        raise RawBenchError(
            f"fi_rawbench failed (client rc={client.returncode}, server rc={server.returncode}): "
            f"{result.get('error')}\nclient: {client.stderr.strip()}\nserver: {s_err.strip()}",
            result,
        )
    return result


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


def _cpu_idle_fraction(interval: float = 0.5) -> float:
    """Fraction of all CPUs idle over `interval` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    i0, t0 = snap()
    time.sleep(interval)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, min_idle: float = 0.9) -> float:
    """Wait (up to max_wait s) until the machine is mostly idle; return the idle fraction."""
    deadline = time.monotonic() + max_wait
    while True:
        idle = _cpu_idle_fraction()
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle
        time.sleep(0.5)


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
