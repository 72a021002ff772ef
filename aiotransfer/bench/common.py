"""What every backend of the harness shares: points, the two-process runner,
the timing and CPU conventions, the data pattern and the metrics.

Conventions (the same for every backend, see docs/benchmarks.md):

- The target ("server") and the initiator ("client") run in two separate
  processes started here (multiprocessing, spawn); the harness process only
  starts them, collects their results and measures idle CPU.
- A point is ``mode`` (``bw``, ``rate`` or ``lat``), ``size``, ``window``
  (writes in flight), ``iters`` measured writes after ``warmup`` writes.
- Write ``i`` moves slot ``(i % window) % slots`` of the source region to the
  same slot of the target region; ``slots`` is the window, capped so that a
  region stays within 256 MiB.  The source holds :func:`pattern`, so after a
  bandwidth or rate point the receiver checks its whole region against the
  pattern it computes itself.
- Times are ``CLOCK_MONOTONIC`` (shared by both processes).  Throughput is
  end to end: from the client's first measured post (after the warm-up has
  fully completed) to the target's last arrival, as the target learns it
  (an immediate, a notification); a backend whose API tells the target
  nothing uses the client's completion of its last write instead, which the
  backend must define as "placed at the target".
- CPU: process CPU (user + system, every thread) of each side over its
  measured phase, per measured operation; idle CPU: ``/proc/<pid>/stat``
  of a process holding an open engine, over ``seconds``.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import resource
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
REGION_BUDGET = 256 * MIB
SEED_DATA = 7
SEED_PONG = 11
UVLOOP_SUFFIX = "-uvloop"   # an aiotransfer style so named runs both processes on uvloop


class Unavailable(RuntimeError):
    """A backend cannot run on this machine; the message says exactly why."""


class BenchError(RuntimeError):
    """One run failed (error in a process, timeout, failed verification)."""


@dataclass(frozen=True)
class Point:
    mode: str            # "bw", "rate" or "lat"
    size: int            # bytes per write (per page for paged styles)
    window: int          # writes (pages) in flight
    iters: int           # measured writes (lat: round trips)
    pages: int | None = None    # paged styles: pages per call (raw C: pages in the region)
    warmup: int | None = None   # default: max(10% of iters, min(iters, 16))

    @property
    def nwarm(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return max(self.iters // 10, min(self.iters, 16))

    @property
    def slots(self) -> int:
        """Distinct write targets (slots of `size` bytes) in each region."""
        return max(1, min(self.window, REGION_BUDGET // max(self.size, 1),
                          self.nwarm + self.iters))

    @property
    def region(self) -> int:
        return max(self.slots * self.size, 64)

    def slot(self, i: int) -> int:
        return (i % self.window) % self.slots

    def as_dict(self) -> dict:
        return asdict(self)


def now() -> float:
    """The clock of every timestamp (both processes read the same one)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_idle_fraction(interval: float = 0.5) -> float:
    """Fraction of all CPUs idle over `interval` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    i0, t0 = snap()
    time.sleep(interval)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, min_idle: float = 0.9, interval: float = 0.5) -> float:
    """Wait (up to max_wait s) until the machine is mostly idle; return the idle fraction.
    Both sides of a run poll or wake up often, so other load distorts the figures."""
    deadline = time.monotonic() + max_wait
    while True:
        idle = cpu_idle_fraction(interval)
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle
        time.sleep(interval)


def pattern(nbytes: int, seed: int = SEED_DATA) -> np.ndarray:
    """Deterministic bytes, different in every 8-byte word (a write that lands
    at the wrong offset does not pass)."""
    n8 = (nbytes + 7) // 8
    x = np.arange(n8, dtype=np.uint64)
    x ^= np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(32)
    return x.view(np.uint8)[:nbytes].copy()


def zeros(nbytes: int) -> np.ndarray:
    """A region's memory, for every backend alike: aiotransfer.alloc (2 MiB
    aligned, transparent huge pages from 2 MiB up), as the C reference's."""
    from ..memory import alloc
    return alloc(nbytes)


def pattern_region(nbytes: int, seed: int = SEED_DATA) -> np.ndarray:
    """:func:`pattern` in memory from :func:`zeros`."""
    buf = zeros(nbytes)
    buf[:] = pattern(nbytes, seed)
    return buf


def verify_region(dst: np.ndarray, point: Point) -> bool:
    """The receiver's check after a bandwidth/rate point: every slot holds the
    bytes the client wrote there."""
    n = point.slots * point.size
    return bool(np.array_equal(dst[:n], pattern(n)))


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_vals:
        raise ValueError("no samples")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def paired_ratios(ref_runs: list, runs: list) -> list[float]:
    """``runs[i] / ref_runs[i]`` for every repeat where both measured something.

    The harness runs the backends of a point alternately, so run ``i`` of
    each was made within seconds of the other: the ratio of a pair cancels
    the machine's slow minutes, which move both alike."""
    return [b / a for a, b in zip(ref_runs, runs) if a and b is not None]


def median_interval(vals: list[float], level: float = 0.9) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median: ``(lo, hi, coverage)``.

    The interval is the k-th smallest to the k-th largest sample, k the largest
    for which the interval covers the true median with probability >= level
    (binomial, p = 1/2).  Below the sample count where even (min, max) reaches
    the level (5 samples for 0.9), it is (min, max) with its smaller coverage.
    """
    if not vals:
        raise ValueError("no samples")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    xs = sorted(vals)
    n = len(xs)

    def coverage(k: int) -> float:   # P(x_(k) <= median <= x_(n-k+1)), k from 1
        tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
        return 1 - 2 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


# ------------------------------------------------------------------ runner

def _child(fn: Callable, peer, result, env: dict, cfg: dict, log: str | None) -> None:
    os.environ.update(env)
    if log:
        # the peers' native libraries log to stdout/stderr: keep them off the terminal
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        out = fn(peer, cfg)
        result.send(("ok", out))
    except BaseException as exc:   # noqa: BLE001 -- reported to the harness
        result.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        result.close()
    # peer libraries may keep threads that block interpreter exit; the result is out
    os._exit(0)


def _start(ctx, fn: Callable, peer, env: dict | None, cfg: dict, name: str, log: str | None):
    r_recv, r_send = ctx.Pipe(duplex=False)
    env = {"OPENBLAS_NUM_THREADS": "1", **(env or {})}
    p = ctx.Process(target=_child, args=(fn, peer, r_send, env, cfg, log), daemon=True,
                    name=name)
    p.start()
    r_send.close()
    return p, r_recv


def _reap(procs: list, grace: float) -> None:
    for p in procs:
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()


def _tail(path: str | None, lines: int = 12) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return ""
    return ("\n  output: " + "\n  ".join(text[-lines:])) if text else ""


class _Log:
    """Where the children's stdout/stderr go: a temporary file when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.path = None
        if quiet:
            fd, self.path = tempfile.mkstemp(prefix="aiotransfer-bench-", suffix=".log")
            os.close(fd)

    def tail(self) -> str:
        return _tail(self.path)

    def close(self) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def run_pair(server: Callable, client: Callable, cfg: dict, *, env: dict | None = None,
             timeout: float = 300.0, quiet: bool = False) -> tuple[dict, dict]:
    """Run ``server(conn, cfg)`` and ``client(conn, cfg)`` in two processes joined
    by a duplex pipe; return their result dicts.  Either side's exception, a
    crash or the timeout raises BenchError (and both processes are ended).
    ``quiet``: the processes' own output is kept out of the terminal (and
    quoted in the error when a run fails)."""
    ctx = mp.get_context("spawn")
    s_peer, c_peer = ctx.Pipe()
    started = []
    pending: dict = {}
    results: dict[str, Any] = {}
    grace = 10.0
    log = _Log(quiet)
    try:
        for role, fn, peer in (("server", server, s_peer), ("client", client, c_peer)):
            p, r = _start(ctx, fn, peer, env, cfg, f"bench-{role}", log.path)
            started.append(p)
            pending[r] = (role, p)
        s_peer.close()
        c_peer.close()
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                grace = 0
                raise BenchError(f"timed out after {timeout:.0f} s waiting for the "
                                 + " and ".join(role for role, _ in pending.values())
                                 + log.tail())
            for r in multiprocessing.connection.wait(list(pending), timeout=left):
                role, p = pending.pop(r)
                try:
                    status, out = r.recv()
                except EOFError:
                    p.join(2)
                    status, out = "error", f"process died (exit code {p.exitcode})"
                if status != "ok":
                    grace = 0
                    raise BenchError(f"{role}: {out}{log.tail()}")
                results[role] = out
    finally:
        _reap(started, grace)
        log.close()
    return results["server"], results["client"]


def measure_idle(opener: Callable, cfg: dict, *, env: dict | None = None,
                 seconds: float = 5.0, settle: float = 0.5, timeout: float = 120.0,
                 quiet: bool = False) -> float:
    """Percent of one core used by a process holding an open, idle engine.

    ``opener(conn, cfg)`` runs in a child: it opens the engine, sends "ready",
    waits for any message on ``conn`` and closes the engine.  The harness
    samples the child's /proc/<pid>/stat over ``seconds`` after ``settle``."""
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    log = _Log(quiet)
    p, r = _start(ctx, opener, theirs, env, cfg, "bench-idle", log.path)
    theirs.close()
    try:
        if not mine.poll(timeout):
            raise BenchError("idle engine did not open in time" + log.tail())
        try:
            mine.recv()
        except EOFError:
            status, out = r.recv() if r.poll(5) else ("error", "process died")
            raise BenchError(f"idle engine: {out}{log.tail()}") from None
        time.sleep(settle)
        c0, t0 = proc_cpu_seconds(p.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = proc_cpu_seconds(p.pid), time.monotonic()
        mine.send("stop")
        if r.poll(30):
            status, out = r.recv()
            if status != "ok":
                raise BenchError(f"idle engine: {out}{log.tail()}")
        return (c1 - c0) / (t1 - t0) * 100
    finally:
        _reap([p], 10)
        log.close()


# ----------------------------------------------------------------- metrics

def summarize(point: Point, server: dict, client: dict) -> dict:
    """The metrics of one run from the two sides' raw results.

    bw/rate: ``t_first``/``t_done``/``cpu`` (client), ``t_last`` (server, when
    its API tells it), ``cpu`` and ``verified`` (server); ``ops`` (client,
    default ``point.iters``) measured operations.  lat: ``rtt`` (client,
    seconds per measured round trip)."""
    res: dict[str, Any] = {}
    if point.mode == "lat":
        one_way = sorted(r / 2 * 1e6 for r in client["rtt"])
        res["lat_us_median"] = percentile(one_way, 50)
        res["lat_us_p90"] = percentile(one_way, 90)
        res["lat_us_p99"] = percentile(one_way, 99)
        res["lat_us_min"] = one_way[0]
    else:
        ops = client.get("ops", point.iters)
        t_last = server.get("t_last") or client["t_done"]
        e2e = t_last - client["t_first"]
        send = client["t_done"] - client["t_first"]
        res["end"] = "target" if server.get("t_last") else "initiator completion"
        res["ops"] = ops
        res["gbps_e2e"] = ops * point.size / e2e / 1e9 if e2e > 0 else None
        res["mops_e2e"] = ops / e2e / 1e6 if e2e > 0 else None
        res["gbps_send"] = ops * point.size / send / 1e9 if send > 0 else None
        res["cpu_us_per_op_client"] = client["cpu"] / ops * 1e6
        res["cpu_us_per_op_server"] = server["cpu"] / ops * 1e6 if "cpu" in server else None
    res["verified"] = bool(server.get("verified")) and bool(client.get("verified", True))
    diag = {f"server_{k}": v for k, v in server.items() if k in ("stats", "info")}
    diag.update({f"client_{k}": v for k, v in client.items() if k in ("stats", "info")})
    if diag:
        res["diag"] = diag
    return res
