"""NIXL backend (pip ``nixl``), through its public Python API ``nixl_agent``,
UCX backend, over tcp or over shared memory.

- tcp: ``UCX_TLS=tcp``, ``UCX_NET_DEVICES=lo`` (loopback only).
- shm: ``UCX_TLS=sm,self`` (UCX's shared-memory transports: posix/sysv
  mappings, CMA); the UCX backend is created with
  ``ucx_error_handling_mode=none`` because none of these transports can
  detect a failed peer, and NIXL's default mode ("peer") then refuses to
  create its endpoints.  tcp uses NIXL's defaults.
- style ``poll`` (default): agent without its progress thread: the
  application's calls (``check_xfer_state``, ``get_new_notifs``) progress UCX,
  as in NIXL's own examples' polling loops.  Faster on these 2-core machines,
  where the default progress threads of two agents take both cores.
  Style ``pthread``: NIXL's default configuration (progress thread on).

Memory is registered as DRAM; agents exchange their metadata through the
harness pipe (``get_agent_metadata``/``add_remote_agent``).  The client
prepares both descriptor lists once (``prep_xfer_dlist``) and one transfer
handle per window position (``make_prepped_xfer``, WRITE, with a
notification); the client polls every handle in flight and reposts each one
as soon as it is DONE, so ``window`` writes stay in flight.  The target
counts notifications; a point ends at the last one.

Latency: an 8-byte WRITE with a notification, ping-pong: post, poll
``check_xfer_state`` until DONE (over tcp the notification leaves only
then), poll ``get_new_notifs`` for the peer's answer.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
from collections import deque

import numpy as np

from .common import (SEED_PONG, Point, cpu_seconds, now, pattern, pattern_region,
                     verify_region, zeros)

UCX_ENV = {
    "tcp": {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"},
    "shm": {"UCX_TLS": "sm,self"},
}
NOTIF_DATA = b"w"
NOTIF_PING = b"p"
NOTIF_PONG = b"q"

_CHECK = """
import nixl
from nixl._api import nixl_agent, nixl_agent_config
a = nixl_agent("probe", nixl_agent_config(enable_prog_thread=False, backends=[]))
assert "UCX" in a.get_plugin_list(), "no UCX plugin in " + repr(a.get_plugin_list())
a.create_backend("UCX", %r)
import os; os._exit(0)   # the agent's teardown at interpreter exit can crash
"""


def env(transport: str, style: str) -> dict:
    return {**UCX_ENV[transport], "NIXL_LOG_LEVEL": "WARN"}


def _backend_params(transport: str) -> dict:
    return {"ucx_error_handling_mode": "none"} if transport == "shm" else {}


def unavailable(transport: str) -> str | None:
    if transport not in UCX_ENV:
        return f"NIXL is measured over tcp and shm only (asked: {transport})"
    if importlib.util.find_spec("nixl") is None:
        return "not installed (pip install nixl, or the 'peers' extra)"
    proc = subprocess.run([sys.executable, "-c", _CHECK % _backend_params(transport)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env(transport, "poll")})
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return "NIXL UCX agent failed: " + (lines[-1] if lines else f"rc {proc.returncode}")
    return None


def _agent(name: str, cfg: dict):
    from nixl._api import nixl_agent, nixl_agent_config

    conf = nixl_agent_config(enable_prog_thread=cfg.get("style") == "pthread",
                             enable_listen_thread=False, backends=[])
    agent = nixl_agent(name, conf)
    agent.create_backend("UCX", _backend_params(cfg["transport"]))
    return agent


def _register(agent, buf: np.ndarray):
    return agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")


def _exchange(agent, conn, info: dict) -> tuple[str, dict]:
    conn.send({"md": agent.get_agent_metadata(), **info})
    peer = conn.recv()
    name = agent.add_remote_agent(peer["md"])
    return (name.decode() if isinstance(name, bytes) else name), peer


def _dlists(agent, remote: str, local_addr: int, remote_addr: int, size: int, n: int):
    local = agent.prep_xfer_dlist("", [(local_addr + i * size, size, 0) for i in range(n)], "DRAM")
    rem = agent.prep_xfer_dlist(remote, [(remote_addr + i * size, size, 0) for i in range(n)],
                                "DRAM")
    return local, rem


def _post(agent, handle) -> None:
    if agent.transfer(handle) == "ERR":
        raise RuntimeError("nixl transfer() failed")


def _wait_done(agent, handle, deadline: float) -> None:
    while True:
        state = agent.check_xfer_state(handle)
        if state == "DONE":
            return
        if state == "ERR":
            raise RuntimeError("nixl transfer ended in ERR")
        if now() > deadline:
            raise TimeoutError("nixl transfer did not complete")


def _count_notifs(agent, remote: str, msg: bytes, want: int, deadline: float, have: int = 0) -> int:
    """Poll notifications until `want` messages `msg` from `remote` arrived."""
    while have < want:
        got = agent.get_new_notifs().get(remote)
        if got:
            have += sum(1 for m in got if m == msg)
        elif now() > deadline:
            raise TimeoutError(f"{have} of {want} notifications")
    return have


def _recv_progressing(agent, conn, timeout: float = 60.0):
    """conn.recv() while keeping UCX progressing: without a progress thread a
    notification still queued at the sender moves only when its agent is called."""
    deadline = now() + timeout
    while not conn.poll(0.0005):
        agent.get_new_notifs()
        if now() > deadline:
            raise TimeoutError("peer did not answer")
    return conn.recv()


def server_main(conn, cfg: dict) -> dict:
    point = Point(**cfg["point"])
    agent = _agent("target", cfg)
    dst = zeros(point.region)
    back = pattern(64, SEED_PONG)
    regs = [_register(agent, dst), _register(agent, back)]
    remote, peer = _exchange(agent, conn, {"addr": dst.ctypes.data})
    res: dict = {}
    if point.mode == "lat":
        local, rem = _dlists(agent, remote, back.ctypes.data, peer["pong"], 8, 1)
        pong = agent.make_prepped_xfer("WRITE", local, [0], rem, [0], NOTIF_PONG)
        conn.send("ready")
        for i in range(point.nwarm + point.iters):
            _count_notifs(agent, remote, NOTIF_PING, 1, now() + 60)
            _post(agent, pong)
            _wait_done(agent, pong, now() + 60)
        res["verified"] = bool(np.array_equal(dst[:8], pattern(8)))
    else:
        conn.send("ready")
        deadline = now() + 600
        have = _count_notifs(agent, remote, NOTIF_DATA, point.nwarm, deadline)
        c0 = cpu_seconds()
        _count_notifs(agent, remote, NOTIF_DATA, point.nwarm + point.iters, deadline, have)
        res["t_last"] = now()
        res["cpu"] = cpu_seconds() - c0
        res["verified"] = verify_region(dst, point)
    conn.send("done")
    _recv_progressing(agent, conn)
    for r in regs:
        agent.deregister_memory(r)
    return res


def client_main(conn, cfg: dict) -> dict:
    point = Point(**cfg["point"])
    agent = _agent("initiator", cfg)
    src = pattern_region(point.region)
    pong = np.zeros(64, dtype=np.uint8)
    regs = [_register(agent, src), _register(agent, pong)]
    remote, peer = _exchange(agent, conn, {"pong": pong.ctypes.data})
    conn.recv()     # the target loaded our metadata
    out: dict = {}
    if point.mode == "lat":
        local, rem = _dlists(agent, remote, src.ctypes.data, peer["addr"], 8, 1)
        ping = agent.make_prepped_xfer("WRITE", local, [0], rem, [0], NOTIF_PING)
        rtts = []
        for i in range(point.nwarm + point.iters):
            t = now()
            _post(agent, ping)
            # the notification leaves once the write is seen complete (over tcp
            # that takes check_xfer_state calls), so: wait DONE, then the pong
            _wait_done(agent, ping, now() + 60)
            _count_notifs(agent, remote, NOTIF_PONG, 1, now() + 60)
            if i >= point.nwarm:
                rtts.append(now() - t)
        out["rtt"] = rtts
        out["verified"] = bool(np.array_equal(pong[:8], pattern(8, SEED_PONG)))
    else:
        local, rem = _dlists(agent, remote, src.ctypes.data, peer["addr"], point.size,
                             point.slots)
        handles = [agent.make_prepped_xfer("WRITE", local, [point.slot(k)], rem,
                                           [point.slot(k)], NOTIF_DATA)
                   for k in range(point.window)]
        deadline = now() + 600

        def phase(lo: int, hi: int) -> None:
            free = deque(handles)
            inflight: list = []
            i = lo
            while i < hi or inflight:
                while free and i < hi:
                    h = free.popleft()
                    _post(agent, h)
                    inflight.append(h)
                    i += 1
                still = []
                for h in inflight:
                    state = agent.check_xfer_state(h)
                    if state == "DONE":
                        free.append(h)
                    elif state == "ERR":
                        raise RuntimeError("nixl transfer ended in ERR")
                    else:
                        still.append(h)
                inflight = still
                if now() > deadline:
                    raise TimeoutError("nixl transfers did not complete")

        phase(0, point.nwarm)
        out["t_first"] = now()
        c0 = cpu_seconds()
        phase(point.nwarm, point.nwarm + point.iters)
        out["t_done"] = now()
        out["cpu"] = cpu_seconds() - c0
    _recv_progressing(agent, conn)
    conn.send("bye")
    for r in regs:
        agent.deregister_memory(r)
    return out


def idle_main(conn, cfg: dict) -> dict:
    agent = _agent("idle", cfg)
    buf = np.zeros(1 << 20, dtype=np.uint8)
    reg = _register(agent, buf)
    conn.send("ready")
    conn.recv()
    agent.deregister_memory(reg)
    return {}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    try:
        out["nixl"] = version("nixl")
    except PackageNotFoundError:
        return out
    try:
        import ctypes

        spec = importlib.util.find_spec("nixl_cu13") or importlib.util.find_spec("nixl_cu12")
        libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(spec.origin)),
                                      f"{spec.name}.libs", "libucp-*.so*"))
        lib = ctypes.CDLL(libs[0])
        lib.ucp_get_version_string.restype = ctypes.c_char_p
        out["ucx"] = lib.ucp_get_version_string().decode()
    except Exception:   # noqa: BLE001 -- best effort
        pass
    return out
