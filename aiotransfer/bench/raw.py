"""The raw C libfabric reference (fi_rawbench.c, next to this file).

:func:`build` compiles it on demand with the system C compiler against the
system libfabric (``pkg-config libfabric``, or ``AIOTRANSFER_LIBFABRIC_PREFIX``
as for the package build) into a per-user cache directory
(``$XDG_CACHE_HOME/aiotransfer``, default ``~/.cache/aiotransfer``); the file
name carries a hash of the source and flags, so an edit rebuilds.  When it
cannot be built, :class:`~aiotransfer.bench.common.Unavailable` says why.

:func:`run_raw` starts the server and the client as two processes on this
host (out-of-band TCP on 127.0.0.1 only; IP providers are pinned to the IPv4
loopback domain ``lo``) and returns the client's JSON result as a dict.

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

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from .common import BenchError, Point, Unavailable

SOURCE = Path(__file__).resolve().with_name("fi_rawbench.c")
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra"]
PROVIDERS = ("tcp;ofi_rxm", "shm", "udp;ofi_rxd", "sockets")
MODES = ("bw", "rate", "lat", "paged")


class RawBenchError(BenchError):
    """The benchmark failed (non-zero exit, no result, or verification failure)."""

    def __init__(self, msg: str, result: Optional[dict] = None):
        super().__init__(msg)
        self.result = result


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aiotransfer"


def _libfabric_flags() -> list[str]:
    prefix = os.environ.get("AIOTRANSFER_LIBFABRIC_PREFIX")
    if prefix:
        inc = Path(prefix) / "include"
        if not (inc / "rdma" / "fabric.h").exists():
            raise Unavailable(f"cannot build the raw C reference: AIOTRANSFER_LIBFABRIC_PREFIX="
                              f"{prefix} has no include/rdma/fabric.h")
        libs = [d for d in (Path(prefix) / "lib", Path(prefix) / "lib64") if d.is_dir()]
        return ([f"-I{inc}"] + [f"-L{d}" for d in libs] + [f"-Wl,-rpath,{d}" for d in libs]
                + ["-lfabric"])
    if shutil.which("pkg-config") is None:
        raise Unavailable("cannot build the raw C reference: pkg-config not found "
                          "(Debian: apt-get install pkg-config libfabric-dev)")
    proc = subprocess.run(["pkg-config", "--cflags", "--libs", "libfabric"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable("cannot build the raw C reference: pkg-config does not know "
                          "libfabric (Debian: apt-get install libfabric-dev)")
    return proc.stdout.split()


def build(force: bool = False) -> Path:
    """Path of the compiled reference, compiling it first if needed."""
    if not SOURCE.exists():
        raise Unavailable(f"cannot build the raw C reference: {SOURCE} is missing")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise Unavailable(f"cannot build the raw C reference: no C compiler ({cc}) on PATH "
                          "(Debian: apt-get install gcc)")
    flags = _libfabric_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc] + CFLAGS + flags).encode())
    binary = cache_dir() / f"fi_rawbench-{key.hexdigest()[:16]}"
    if binary.exists() and not force:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), *flags],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"cannot build the raw C reference: {cc} failed:\n"
                          f"{proc.stdout}{proc.stderr}".rstrip())
    os.replace(tmp, binary)
    return binary


def unavailable(transport: str = "") -> str | None:
    try:
        build()
    except Unavailable as exc:
        return str(exc)
    return None


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
    pages: mode "paged": pages in the region (required); "bw"/"rate": slots,
        write i goes to slot (i % window) % pages, as on the aiotransfer side
        (default 1: every write to offset 0, which stays in the caches).
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


def run_point(provider: str, style: str, point: Point, timeout: float) -> dict:
    """One harness point: ``style`` "write" runs the point's mode over the
    point's slots (``Point.slot``), "paged" the C program's paged mode
    (``point.pages`` pages in the region, default the harness's slot count)."""
    mode = "paged" if style == "paged" and point.mode != "lat" else point.mode
    # the same memory as the aiotransfer side: a slot per write in flight
    pages = None if mode == "lat" else (point.pages or point.slots) if mode == "paged" \
        else point.slots
    r = run_raw(provider, mode, point.size, point.window, point.iters, pages=pages,
                warmup=point.nwarm, timeout=timeout)
    keys = ("gbps_e2e", "mops_e2e", "gbps_send", "cpu_us_per_op_client",
            "cpu_us_per_op_server", "lat_us_median", "lat_us_p99", "verified")
    out = {k: r.get(k) for k in keys if r.get(k) is not None or k == "verified"}
    if point.mode != "lat":
        out["end"] = "target"
        out["ops"] = point.iters
    out["diag"] = {k: r[k] for k in ("mr_mode", "inject_size", "tx_size") if k in r}
    return out
