"""Mooncake Transfer Engine backend (pip ``mooncake-transfer-engine-non-cuda``),
through its public Python API ``mooncake.engine.TransferEngine``.

Transport ``tcp``, metadata in P2P handshake mode (``P2PHANDSHAKE``: each
engine serves its own segment description on its RPC port, no etcd or HTTP
metadata server), both engines on ``127.0.0.1`` (``MC_TCP_BIND_ADDRESS`` too).

Writes: ``batch_transfer_async_write`` of half a window each, two batches in
flight (``window`` writes), the older one awaited with
``get_batch_transfer_status``: the same "refill at half window" pipeline as
the aiotransfer client.  Mooncake's async writes tell the target nothing, so
a point ends at the initiator's completion of its last write; from 0.3.12 on,
the tcp transport completes a write only when the target acknowledges that
the bytes are applied to its memory (acknowledged framing, "v2"), i.e. placed.

Latency: ``transfer_sync`` (8 B write) with a ``TransferNotify``; the peer
polls ``get_notifies()`` and answers the same way.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np

from .common import (SEED_PONG, Point, cpu_seconds, now, pattern, pattern_region,
                     verify_region, zeros)

HOST = "127.0.0.1"
ENV = {"MC_LOG_LEVEL": "WARNING", "MC_TCP_BIND_ADDRESS": HOST}
PACKAGE = "mooncake-transfer-engine-non-cuda"


def env(transport: str, style: str) -> dict:
    return dict(ENV)


def unavailable(transport: str) -> str | None:
    if transport != "tcp":
        return f"Mooncake is measured over tcp only (asked: {transport})"
    if importlib.util.find_spec("mooncake") is None:
        return f"not installed (pip install {PACKAGE}, or the 'peers' extra)"
    proc = subprocess.run([sys.executable, "-c", "import mooncake.engine"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV})
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return "import mooncake.engine failed: " + (lines[-1] if lines else f"rc {proc.returncode}")
    return None


def _open():
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    rc = eng.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize(P2PHANDSHAKE, tcp) returned {rc}")
    return eng


def _register(eng, buf: np.ndarray) -> None:
    rc = eng.register_memory(buf.ctypes.data, buf.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory returned {rc}")


def _session(eng) -> str:
    return f"{HOST}:{eng.get_rpc_port()}"


def _await_notify(eng, name: str, deadline: float) -> None:
    while True:
        for n in eng.get_notifies():
            if n.name == name:
                return
        if now() > deadline:
            raise TimeoutError(f"no '{name}' notification")


def server_main(conn, cfg: dict) -> dict:
    from mooncake.engine import TransferEngine, TransferNotify

    point = Point(**cfg["point"])
    eng = _open()
    dst = zeros(point.region)
    back = pattern(64, SEED_PONG)
    _register(eng, dst)
    _register(eng, back)
    conn.send({"session": _session(eng), "addr": dst.ctypes.data})
    peer = conn.recv()
    res: dict = {}
    if point.mode == "lat":
        write = TransferEngine.TransferOpcode.Write
        for _ in range(point.nwarm + point.iters):
            _await_notify(eng, "ping", now() + 60)
            rc = eng.transfer_sync(peer["session"], back.ctypes.data, peer["pong"], 8, write,
                                   TransferNotify("pong", ""))
            if rc != 0:
                raise RuntimeError(f"transfer_sync returned {rc}")
        res["verified"] = bool(np.array_equal(dst[:8], pattern(8)))
    else:
        conn.recv()                     # the client starts its measured phase
        c0 = cpu_seconds()
        conn.recv()                     # the client's last write completed
        res["cpu"] = cpu_seconds() - c0
        res["verified"] = verify_region(dst, point)
    conn.send("done")
    conn.recv()
    return res


def client_main(conn, cfg: dict) -> dict:
    from mooncake.engine import TransferEngine, TransferNotify

    point = Point(**cfg["point"])
    eng = _open()
    src = pattern_region(point.region)
    pong = np.zeros(64, dtype=np.uint8)
    _register(eng, src)
    _register(eng, pong)
    peer = conn.recv()
    conn.send({"session": _session(eng), "pong": pong.ctypes.data})
    target = peer["session"]
    out: dict = {}
    if point.mode == "lat":
        write = TransferEngine.TransferOpcode.Write
        rtts = []
        for i in range(point.nwarm + point.iters):
            t = now()
            rc = eng.transfer_sync(target, src.ctypes.data, peer["addr"], 8, write,
                                   TransferNotify("ping", ""))
            if rc != 0:
                raise RuntimeError(f"transfer_sync returned {rc}")
            _await_notify(eng, "pong", now() + 60)
            if i >= point.nwarm:
                rtts.append(now() - t)
        out["rtt"] = rtts
        out["verified"] = bool(np.array_equal(pong[:8], pattern(8, SEED_PONG)))
    else:
        half = max(1, point.window // 2)
        cache: dict = {}

        def batch(lo: int, hi: int) -> int:
            key = (lo % point.window, hi - lo)
            if key not in cache:
                offs = [point.slot(i) * point.size for i in range(lo, hi)]
                cache[key] = ([src.ctypes.data + o for o in offs],
                              [peer["addr"] + o for o in offs], [point.size] * (hi - lo))
            bid = eng.batch_transfer_async_write(target, *cache[key])
            if bid == 0:
                raise RuntimeError("batch_transfer_async_write failed")
            return bid

        def phase(lo: int, hi: int) -> None:
            pending: list[int] = []
            i = lo
            while i < hi or pending:
                while i < hi and len(pending) < 2:
                    j = min(hi, i + half)
                    pending.append(batch(i, j))
                    i = j
                rc = eng.get_batch_transfer_status([pending.pop(0)])
                if rc != 0:
                    raise RuntimeError(f"get_batch_transfer_status returned {rc}")

        phase(0, point.nwarm)
        conn.send("measure")
        out["t_first"] = now()
        c0 = cpu_seconds()
        phase(point.nwarm, point.nwarm + point.iters)
        out["t_done"] = now()
        out["cpu"] = cpu_seconds() - c0
        conn.send("end")
    conn.recv()
    conn.send("bye")
    return out


def idle_main(conn, cfg: dict) -> dict:
    eng = _open()
    buf = np.zeros(1 << 20, dtype=np.uint8)
    _register(eng, buf)
    conn.send("ready")
    conn.recv()
    return {}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"mooncake": version(PACKAGE)}
    except PackageNotFoundError:
        return {}
