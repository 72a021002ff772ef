"""The public asyncio API: TransferEngine, MemoryRegion, ImmCounter.

Layers (see docs/architecture.md):

* ``aiotransfer._core`` -- synchronous Cython wrappers of the C progress
  worker (csrc/atx.c): posting, registration, immediate counters, records.
* ``aiotransfer._core.Completions`` (``_futures.pxi``) -- the futures
  layer: op ids -> futures, one ``loop.add_reader`` on the worker's eventfd,
  drained once per wake-up; the hot path (write) is posted from there.
* ``TransferEngine`` -- argument checking and the public calls.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import os
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import numpy as np

from . import _core
from ._wire import MAX_NICS, EngineAddress, RemoteRegion
from .errors import EngineClosedError, PeerError, TransferError

__all__ = [
    "TransferEngine", "MemoryRegion", "ImmCounter", "ScatterTarget", "NicInfo",
    "PROVIDER_ALIASES", "resolve_provider", "provider_nics",
]

IMM_LIMIT = 1 << 32

#: Short names accepted for ``provider=``.
PROVIDER_ALIASES = {
    "tcp": "tcp;ofi_rxm",
    "udp": "udp;ofi_rxd",
    "verbs": "verbs;ofi_rxm",
}

Destination = Union[RemoteRegion, bytes, bytearray, memoryview]

#: Defaults that work around provider behaviour measured here (docs/providers.md):
#: sockets stalls with 64 or more writes in flight, and under manual progress
#: its CQ wait fd does not wake a target whose data is waiting to be progressed.
#: shm copies every write on the target under one lock per endpoint (its
#: region): with two endpoints the initiator posts to and reaps from one
#: while the target copies from the other, and the first endpoint is a copy
#: lane whose writes the initiator copies itself (docs/benchmarks.md).
PROVIDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sockets": {"tx_depth": 16, "wait_fd": False},
    "shm": {"endpoints": 2, "copy_lane": True},
}


def resolve_provider(provider: str | None) -> str:
    """Map an alias ("tcp", "udp") to libfabric's provider name."""
    if provider is None:
        provider = os.environ.get("AIOTRANSFER_PROVIDER", "tcp")
    if not isinstance(provider, str) or not provider:
        raise TypeError(f"provider must be a non-empty str, not {provider!r}")
    return PROVIDER_ALIASES.get(provider, provider)


def sysfs_link_speed(nic: str) -> int | None:
    """Link speed in bit/s of a network interface from sysfs, None if unknown."""
    try:
        with open(f"/sys/class/net/{nic}/speed") as f:
            mbps = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return mbps * 1_000_000 if mbps > 0 else None


def provider_nics(provider: str | None = None, *, gpu: int | None = None) -> list[str]:
    """The NICs (domain names) ``provider`` offers here, in the order
    ``TransferEngine(nics=<count>)`` takes them: the topology's NICs for
    ``gpu`` first, then the rest by name; loopback only if nothing else."""
    prov = resolve_provider(provider)
    names: list[str] = []
    for p, dom, _fab, _speed, ipv4 in _core.fabric_info(prov):
        if dom not in names and (ipv4 or not prov.startswith(("tcp", "udp", "sockets"))):
            names.append(dom)
    real = sorted((n for n in names if n != "lo"), key=_natural)
    first = [n for n in _topology_nics(prov, gpu, set(names)) if n in real]
    out = first + [n for n in real if n not in first]
    return out or names


def _natural(name: str) -> tuple:
    """Sort key: "nic2" before "nic10"."""
    import re
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@functools.lru_cache(maxsize=1)
def _host_topology() -> Any:
    """This host's topology, read from /sys once per process (None if unreadable)."""
    from . import topology
    try:
        return topology.detect()
    except Exception:   # odd sysfs: fall back to the provider's default
        return None


def _topology_nics(provider: str, gpu: int | None, offered: set[str] | None = None
                   ) -> list[str]:
    """NIC names the topology assigns to ``gpu`` that the provider offers
    (``offered``: its domain names, looked up if not given); [] when there is
    no such group, e.g. no GPU or no topology info."""
    topo = _host_topology()
    try:
        group = topo.group_for_gpu(gpu or 0) if topo is not None else None
    except Exception:   # no such GPU
        return []
    if group is None or group.gpu is None:
        return []
    if offered is None:
        offered = {dom for p, dom, *_ in _core.fabric_info(provider)}
    return [d for d in group.domains(provider) if d in offered]


# ------------------------------------------------------------------ checks

def _uint(name: str, value: Any, limit: int = 1 << 64) -> int:
    """An integer argument in [0, limit), else TypeError/ValueError naming it."""
    return _core.arg_uint(name, value, limit)


def _imm(name: str, value: Any) -> int:
    return _uint(name, value, IMM_LIMIT)


def _timeout(value: Any, name: str = "timeout") -> float | None:
    """None or a finite number of seconds >= 0, else TypeError/ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not "
                        f"{type(value).__name__}")
    if not 0 <= value < float("inf"):   # also rejects nan
        raise ValueError(f"{name}={value!r} must be a finite number >= 0 or None")
    return float(value)


def _tunable(name: str, value: Any, env: str, default: str, lo: float, hi: float,
             what: str, bounds: str) -> float:
    """A numeric keyword (``$env`` or ``default`` when None) in [lo, hi],
    else ValueError naming it."""
    if value is None:
        value = float(os.environ.get(env, default))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} must be {what} in {bounds}")
    return float(value)


#: Tunables the C core reads from the environment when an engine starts
#: (docs/install.md), with the least value each may take.
CORE_ENV = {"AIOTRANSFER_SPIN_US": 0, "AIOTRANSFER_COALESCE_US": 0,
            "AIOTRANSFER_MAX_IMM_VALUES": 1, "AIOTRANSFER_COPY_LANE_MIN": 0}


def _check_core_env() -> None:
    """ValueError naming the variable if one of CORE_ENV is set to anything
    but a whole number in its range (the C core would read "2k" as 2)."""
    for name, lo in CORE_ENV.items():
        text = os.environ.get(name)
        if text is None or text == "":
            continue
        if not (text.isascii() and text.isdigit()) or not lo <= int(text) < 2 ** 63:
            raise ValueError(f"${name}={text!r} must be a whole number in [{lo}, 2**63)")


def _iterable(name: str, value: Any) -> list:
    """list(value), or TypeError naming the argument."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of items, not {type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be an iterable, not {type(value).__name__}") from None


def _pages(name: str, pages: Any) -> np.ndarray:
    try:
        arr = np.asarray(pages)
    except Exception as exc:  # noqa: BLE001 - report any conversion failure as TypeError
        raise TypeError(f"{name} must be a sequence or numpy array of integers") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind == "O":   # Python ints beyond 64 bits, or mixed objects
        vals = []
        for i, v in enumerate(arr.tolist()):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}[{i}] must be an integer, not {type(v).__name__}")
            if not 0 <= v <= np.iinfo(np.int64).max:
                raise ValueError(f"{name}[{i}] = {v} is out of range [0, 2**63)")
            vals.append(v)
        return np.array(vals, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds page index {int(arr.max())}, beyond 2**63-1")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_pages(name: str, arr: np.ndarray, offset: int, stride: int, page_size: int,
                 nbytes: int, region: str) -> None:
    if arr.size == 0:
        return
    lo = int(arr.min())
    if lo < 0:
        raise ValueError(f"{name} holds negative page index {lo}")
    hi = int(arr.max())
    end = offset + hi * stride + page_size
    if end > nbytes:
        raise ValueError(
            f"{name}: page {hi} ends at byte {end} (offset {offset} + {hi} * stride {stride} "
            f"+ page_size {page_size}), beyond the {region} region's {nbytes} bytes")


# ------------------------------------------------------------ public types

@dataclass(frozen=True)
class NicInfo:
    """One NIC (libfabric domain) of an engine."""

    name: str
    provider: str
    link_speed: int | None
    fabric: str = ""
    details: dict | None = None
    endpoints: int = 1


@dataclass(frozen=True)
class ScatterTarget:
    """One destination of :meth:`TransferEngine.scatter`."""

    dst: Destination
    length: int
    src_offset: int = 0
    dst_offset: int = 0


class MemoryRegion:
    """A local buffer registered with the NIC(s) of one engine.

    The buffer stays exported (pinned, cannot be resized) until the region is
    deregistered; deregistering with writes in flight raises ``BufferError``.
    """

    __slots__ = ("_engine", "_core", "nbytes", "remote", "descriptor", "obj", "__weakref__")

    def __init__(self, engine: "TransferEngine", core_mr: Any, remote: RemoteRegion,
                 obj: Any) -> None:
        self._engine = engine
        self._core = core_mr
        self.nbytes: int = core_mr.nbytes
        self.remote: RemoteRegion = remote
        self.descriptor: bytes = remote.to_bytes()
        self.obj = obj

    @property
    def address(self) -> int:
        """Local virtual address of byte 0."""
        return self._core.address

    @property
    def closed(self) -> bool:
        return self._core is None

    @property
    def inflight(self) -> int:
        """Operations posted from this region whose completion has not arrived."""
        return self._core.inflight if self._core is not None else 0

    def close(self) -> None:
        """Deregister (same as ``engine.deregister(self)``)."""
        self._engine.deregister(self)

    def __enter__(self) -> "MemoryRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.inflight} in flight"
        return f"<MemoryRegion {self.nbytes} bytes, {state}>"


class ImmCounter:
    """Arrivals of one immediate value at this engine.

    ``value`` is the number of arrivals not yet consumed by a waiter,
    ``total`` every arrival since the engine began counting this value;
    ``await wait(n)`` consumes n arrivals (exactly like
    ``engine.expect_imm(imm, n)``).  While any ImmCounter of a value is
    alive, the engine keeps that value's counter (and so its ``total``); see
    docs/semantics.md for when an unwatched, idle value is forgotten.
    """

    __slots__ = ("_engine", "_core", "imm")

    def __init__(self, engine: "TransferEngine", imm: int) -> None:
        self._engine = engine
        self.imm = imm
        self._core = engine._core_or_closed()
        self._core.imm_pin(imm, True)

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.imm_pin(self.imm, False)    # a no-op once the engine is closed

    @property
    def value(self) -> int:
        return self._engine._core_or_closed().imm_value(self.imm)[0]

    @property
    def total(self) -> int:
        return self._engine._core_or_closed().imm_value(self.imm)[1]

    async def wait(self, n: int, *, timeout: float | None = None) -> None:
        await self._engine.expect_imm(self.imm, n, timeout=timeout)

    def __repr__(self) -> str:
        return f"<ImmCounter imm={self.imm}>"


class _Messages:
    """Control messages that arrived, and the tasks waiting in recv()."""

    def __init__(self, limit: int) -> None:
        self.queue: collections.deque[bytes] = collections.deque()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.limit = limit
        self.dropped = 0

    def deliver(self, data: bytes) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(data)
                return
        if len(self.queue) >= self.limit:
            self.dropped += 1
            return
        self.queue.append(data)

    def close(self, exc: BaseException) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(exc)
        self.waiters.clear()


def _op_error(op: Any, status: int, text: str | None, closing: bool) -> TransferError:
    """The exception for a failed operation record (called by the futures layer)."""
    if closing or (status == _core.FI_ECANCELED and text == "engine closed"):
        return EngineClosedError("engine closed with the operation in flight", op=op.name,
                                 nbytes=op.nbytes, peer=op.peer, code=status)
    cls = PeerError if status == _core.FI_ETIMEDOUT else TransferError
    return cls(f"{op.name} failed: {_core.strerror(status)}", op=op.name,
               nbytes=op.nbytes, peer=op.peer, provider_text=text, code=status)


class TransferEngine:
    """One-sided RDMA writes with immediates over libfabric, for asyncio.

    >>> async with TransferEngine(provider="tcp") as engine:   # doctest: +SKIP
    ...     mr = engine.register(bytearray(1 << 20))
    ...     await engine.write(mr, peer_descriptor, imm=7)

    Parameters: ``provider`` -- libfabric provider name or alias ("tcp",
    "udp", "shm", "sockets"; default ``$AIOTRANSFER_PROVIDER`` or "tcp").
    ``nics`` -- which NICs (libfabric domains) the engine drives: a list of
    names such as ``["eth0", "eth1"]``, a count (the first that many of the
    provider's NICs, see :func:`provider_nics`), or None: ``$AIOTRANSFER_NICS``
    (comma-separated) if set, else the NICs the topology assigns to ``gpu``
    (``aiotransfer.topology``), else the provider's first NIC.
    ``gpu`` -- with ``nics=None``: the GPU whose NIC group to use (default 0).
    ``nic_weights`` -- relative share of each NIC in the selector (default:
    link speeds where all are known, else equal).  The selector also follows
    how fast each NIC really drains, so weights matter most at the start.
    ``stripe`` -- with several NICs, single writes larger than this are cut
    into stripes of this size spread over the NICs (default 512 KiB).
    ``peer_timeout`` -- seconds without any completion from a peer while
    operations to it wait, after which they fail with :class:`PeerError`
    (default 5, ``$AIOTRANSFER_PEER_TIMEOUT``).
    ``failover_timeout`` -- with several NICs: seconds without a completion
    on one NIC's lane to a peer while work waits on it, after which the lane
    is declared down and its work goes over the other NICs (default 1,
    ``$AIOTRANSFER_FAILOVER_TIMEOUT``; see docs/failures.md).
    ``delivery_complete`` -- complete writes only once the data is placed at
    the target (default True; see docs/semantics.md).
    ``msg_size``/``msg_count`` -- size and number of control-message receive
    buffers.  ``cpu`` -- pin the progress worker to this CPU.
    ``max_chunk`` -- split single writes into pieces of at most this size.
    ``tx_depth`` -- work requests in flight per endpoint (default: the
    provider's queue size, or ``$AIOTRANSFER_TX_DEPTH``).
    ``endpoints`` -- endpoints opened on each NIC (default
    ``$AIOTRANSFER_ENDPOINTS``, else 2 on shm and 1 elsewhere).  The selector
    spreads work over them as over NICs: each has its own queue, completion
    queue and connection to each peer.
    ``copy_lane`` -- shm with two or more endpoints: the first endpoint of
    each NIC is a copy lane, whose writes (64 KiB or more,
    ``$AIOTRANSFER_COPY_LANE_MIN``; at most 16 MiB; not page lists or
    scatters) this process copies into the target itself
    inside the post, while the target copies the writes of the other
    endpoints: two cores copy (default True on shm,
    ``$AIOTRANSFER_COPY_LANE`` 0 or 1; see docs/benchmarks.md).  A post on it
    takes as long as its copy.
    ``recv_queue_limit`` -- control messages kept while nobody is in recv().
    ``busy_poll_us`` -- while operations or ``expect_imm`` waiters are
    pending, the event loop's own thread polls the NICs (a callback it runs
    between the others), for this many microseconds after the last
    completion or arrival; the progress thread stands back meanwhile, so a
    completion reaches its future without a thread switch.  After that the
    thread takes over and wakes the loop (default 200,
    ``$AIOTRANSFER_BUSY_POLL_US``; 0: never poll from the loop).  The loop
    uses a core while it polls.
    """

    def __init__(self, provider: str | None = None, *, nics: Sequence[str] | int | None = None,
                 delivery_complete: bool = True, msg_size: int = 65536, msg_count: int = 64,
                 cpu: int | None = None, max_chunk: int | None = None,
                 recv_queue_limit: int = 4096, tx_depth: int | None = None,
                 busy_poll_us: float | None = None, gpu: int | None = None,
                 nic_weights: Sequence[float] | None = None,
                 stripe: int | None = None, peer_timeout: float | None = None,
                 failover_timeout: float | None = None, endpoints: int | None = None,
                 copy_lane: bool | None = None) -> None:
        self.provider = resolve_provider(provider)
        self._nics_arg = self._check_nics(nics)
        self._gpu = None if gpu is None else _uint("gpu", gpu, 1 << 16)
        self._nic_weights = self._check_weights(nic_weights)
        self._stripe = 0 if stripe is None else _uint("stripe", stripe, 1 << 40)
        self._peer_timeout = _tunable("peer_timeout", peer_timeout, "AIOTRANSFER_PEER_TIMEOUT",
                                      "5", 0.01, 86400, "a number of seconds", "[0.01, 86400]")
        self._failover = _tunable("failover_timeout", failover_timeout,
                                  "AIOTRANSFER_FAILOVER_TIMEOUT", "1", 0.01, 86400,
                                  "a number of seconds", "[0.01, 86400]")
        if stripe is not None and self._stripe < 4096:
            raise ValueError(f"stripe={stripe} must be at least 4096 bytes")
        self._delivery_complete = bool(delivery_complete)
        self._msg_size = _uint("msg_size", msg_size)
        if not 1 <= self._msg_size <= 1 << 24:
            raise ValueError(f"msg_size={msg_size} must be in [1, 16 MiB]")
        self._msg_count = _uint("msg_count", msg_count)
        if not 1 <= self._msg_count <= 65536:
            raise ValueError(f"msg_count={msg_count} must be in [1, 65536]")
        _check_core_env()
        self._cpu = -1 if cpu is None else _uint("cpu", cpu, os.cpu_count() or 1)
        self._max_chunk = 0 if max_chunk is None else _uint("max_chunk", max_chunk)
        if max_chunk is not None and self._max_chunk == 0:
            raise ValueError("max_chunk must be positive")
        if tx_depth is None:
            tx_depth = int(os.environ.get("AIOTRANSFER_TX_DEPTH", "0")) or \
                PROVIDER_DEFAULTS.get(self.provider, {}).get("tx_depth", 0)
        self._tx_depth = _uint("tx_depth", tx_depth, 1 << 16)
        if endpoints is None:
            env = os.environ.get("AIOTRANSFER_ENDPOINTS")
            try:
                endpoints = int(env) if env else \
                    PROVIDER_DEFAULTS.get(self.provider, {}).get("endpoints", 1)
            except ValueError:
                raise ValueError(f"$AIOTRANSFER_ENDPOINTS={env!r} must be an integer "
                                 f"in [1, {MAX_NICS}]") from None
        self._endpoints = _uint("endpoints", endpoints)
        if copy_lane is None:
            env = os.environ.get("AIOTRANSFER_COPY_LANE")
            if env is not None and env not in ("0", "1"):
                raise ValueError(f"$AIOTRANSFER_COPY_LANE={env!r} must be 0 or 1")
            copy_lane = env == "1" if env is not None else \
                PROVIDER_DEFAULTS.get(self.provider, {}).get("copy_lane", False)
        self._copy_lane = bool(copy_lane)
        if not 1 <= self._endpoints <= MAX_NICS:
            raise ValueError(f"endpoints={endpoints} must be in [1, {MAX_NICS}]")
        if isinstance(self._nics_arg, (list, int)):
            count = self._nics_arg if isinstance(self._nics_arg, int) else len(self._nics_arg)
            self._check_endpoint_total(count)
        self._msgs = _Messages(_uint("recv_queue_limit", recv_queue_limit))
        self._busy_poll = _tunable("busy_poll_us", busy_poll_us, "AIOTRANSFER_BUSY_POLL_US", "200",
                                   0, 1e6, "a number", "[0, 1e6]") / 1e6
        self._core: Any = None
        self._c: Any = None           # _core.Completions while running
        self._state = "new"
        self._address: EngineAddress | None = None
        self._address_bytes = b""
        self._regions: dict[int, MemoryRegion] = {}
        self._peers: dict[tuple, int] = {}
        self._dests: dict[Any, Any] = {}   # descriptor bytes / RemoteRegion -> _core.Dest
        self._dest_ids: dict[tuple, int] = {}   # (peer, keys, bases) -> the C core's id
        self._nics: list[NicInfo] = []

    @staticmethod
    def _check_nics(nics: Any) -> list[str] | int | None:
        if nics is None:
            env = os.environ.get("AIOTRANSFER_NICS")
            return [n for n in env.split(",") if n] if env else None
        if isinstance(nics, int) and not isinstance(nics, bool):
            if not 1 <= nics <= MAX_NICS:
                raise ValueError(f"nics={nics} must be in [1, {MAX_NICS}]")
            return nics
        if isinstance(nics, str):
            raise TypeError("nics must be a list of NIC names or a count, not a str")
        try:
            names = list(nics)
        except TypeError:
            raise TypeError(f"nics must be a list of NIC names or a count, "
                            f"not {type(nics).__name__}") from None
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError("nics must be a list of non-empty NIC name strings")
        if not 1 <= len(names) <= MAX_NICS:
            raise ValueError(f"nics lists {len(names)} NICs; 1..{MAX_NICS} allowed")
        if len(set(names)) != len(names):
            raise ValueError(f"nics={names} lists a NIC twice")
        return names

    def _check_endpoint_total(self, nics: int) -> None:
        if nics * self._endpoints > MAX_NICS:
            raise ValueError(f"{nics} NIC(s) x endpoints={self._endpoints} is "
                             f"{nics * self._endpoints} endpoints; at most {MAX_NICS}")

    @staticmethod
    def _check_weights(weights: Any) -> list[float] | None:
        if weights is None:
            return None
        if isinstance(weights, (str, bytes)):
            raise TypeError("nic_weights must be a sequence of numbers, not a str")
        try:
            ws = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise TypeError("nic_weights must be a sequence of numbers") from None
        if not ws or not all(w >= 0 and w == w and w != float("inf") for w in ws) \
                or not any(ws):
            raise ValueError(f"nic_weights={list(weights)}: finite numbers >= 0, not all 0")
        return ws

    def _resolve_nics(self) -> list[str]:
        """The NIC names to open ([] = the provider's first NIC)."""
        arg = self._nics_arg
        if isinstance(arg, list):
            return arg
        if isinstance(arg, int):
            avail = provider_nics(self.provider, gpu=self._gpu)
            if arg > len(avail):
                raise ValueError(f"nics={arg}, but provider {self.provider} offers "
                                 f"{len(avail)} usable NIC(s) here: {avail}")
            return avail[:arg]
        return _topology_nics(self.provider, self._gpu)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> "TransferEngine":
        """Open the NIC(s) and start the progress worker."""
        if self._state != "new":
            raise RuntimeError(f"engine already {self._state}")
        loop = asyncio.get_running_loop()
        names = self._resolve_nics()
        self._check_endpoint_total(max(len(names), 1))
        self._engine_id = secrets.randbits(64) or 1
        if self._nic_weights is not None and len(self._nic_weights) != max(len(names), 1):
            raise ValueError(f"nic_weights has {len(self._nic_weights)} entries for "
                             f"{max(len(names), 1)} NIC(s)")
        try:
            core = _core.CoreEngine(
                self.provider, names, stripe=self._stripe, peer_timeout=self._peer_timeout,
                engine_id=self._engine_id, failover=self._failover,
                delivery_complete=self._delivery_complete, msg_size=self._msg_size,
                msg_count=self._msg_count, cpu=self._cpu, max_chunk=self._max_chunk,
                tx_depth=self._tx_depth, endpoints=self._endpoints, copy_lane=self._copy_lane,
                wait_fd=PROVIDER_DEFAULTS.get(self.provider, {}).get("wait_fd", True))
        except _core.CoreError as exc:
            raise TransferError(f"cannot open provider {self.provider!r}", op="start",
                                provider_text=str(exc), code=exc.code) from None
        self._core = core
        self._c = _core.Completions(core, loop, self._msgs.deliver, _op_error,
                                    int(self._busy_poll * 1e9))
        self._c.bind(MemoryRegion, self._dests, self._src, self._dest, self._posted)
        self._address = EngineAddress(self.provider, self._engine_id,
                                      tuple(core.getname(i) for i in range(core.nic_count())),
                                      self._msg_size)
        self._address_bytes = self._address.to_bytes()
        # the core's NIC i is endpoint i % E of NIC i // E
        eps = self._endpoints
        self._nics = []
        for i in range(0, core.nic_count(), eps):
            d = core.nic_info(i)
            speed = d["link_speed"] or sysfs_link_speed(d["name"])
            self._nics.append(NicInfo(d["name"], self.provider, speed, d["fabric"], d, eps))
        ws = self._nic_weights
        if ws is None:
            speeds = [n.link_speed for n in self._nics]
            ws = [s / 1e6 for s in speeds] if all(speeds) else [1.0] * len(speeds)
        top = max(ws)
        for i, w in enumerate(ws):
            for k in range(eps):
                core.set_weight(i * eps + k, max(1, round(w / top * 1_000_000)) if w else 0)
        self._state = "running"
        self._fast_paths(True)
        return self

    _FAST = ("write", "write_imm")

    def _fast_paths(self, on: bool) -> None:
        """While the engine runs, ``self.write`` and ``self.write_imm`` are
        the futures layer's methods themselves (same arguments, checks and
        exceptions): a call costs no Python frame.  A subclass that overrides
        one keeps its override."""
        for name in self._FAST:
            if on and getattr(type(self), name) is getattr(TransferEngine, name):
                setattr(self, name, getattr(self._c, name))
            else:
                self.__dict__.pop(name, None)

    async def close(self) -> None:
        """Stop the worker; every pending operation and waiter fails with
        :class:`EngineClosedError`; every region is deregistered."""
        if self._state != "running":
            self._state = "closed"
            return
        self._state = "closed"
        self._fast_paths(False)
        exc = EngineClosedError("engine closed")
        try:
            # stopping waits (at most 2 s) for work requests at the NIC: not
            # on the event loop's thread
            await asyncio.to_thread(self._core.stop)
        finally:   # even if cancelled: every future resolved, everything released
            self._c.close(exc)
            self._msgs.close(exc)
            for mr in list(self._regions.values()):
                self._core.deregister(mr._core)
                mr._core = None
                mr.obj = None
            self._regions.clear()
            self._dests.clear()
            self._core.destroy()
            self._core = None

    async def __aenter__(self) -> "TransferEngine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "running":
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        return f"<TransferEngine {self.provider} {self._state}>"

    def _core_or_closed(self) -> Any:
        if self._state != "running":
            if self._state == "new":
                raise RuntimeError("engine not started: await engine.start() first")
            raise EngineClosedError("engine is closed")
        return self._core

    # ----------------------------------------------------------- properties

    @property
    def address(self) -> bytes:
        """Everything a peer needs to reach this engine."""
        self._core_or_closed()
        return self._address_bytes

    @property
    def nics(self) -> list[NicInfo]:
        self._core_or_closed()
        return list(self._nics)

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def stats(self, *, per_endpoint: bool = False) -> list[dict]:
        """Per-NIC counters (bytes, work requests, immediates, errors, ...),
        summed over the NIC's endpoints (``weight``: the NIC's share in the
        selector); ``per_endpoint=True``: one dict per endpoint, with its
        ``endpoint`` index."""
        core = self._core_or_closed()
        eps = self._endpoints
        # the core's NIC i is endpoint i % E of NIC i // E (as in start())
        rows = [dict(core.stats(i), nic=self._nics[i // eps].name, endpoint=i % eps)
                for i in range(len(self._nics) * eps)]
        if per_endpoint:
            return rows
        out = []
        for j, n in enumerate(self._nics):
            mine = rows[j * eps:(j + 1) * eps]
            total = {key: sum(r[key] for r in mine) for key in mine[0]
                     if key not in ("nic", "endpoint", "weight")}
            out.append(dict(total, weight=mine[0]["weight"], nic=n.name, endpoints=eps))
        return out

    @property
    def dropped_messages(self) -> int:
        """Control messages dropped because the recv() queue was full."""
        return self._msgs.dropped

    @property
    def pending(self) -> int:
        """Operations whose completion has not arrived yet."""
        return len(self._c.ops) if self._c is not None else 0

    @property
    def imm_values(self) -> int:
        """Distinct immediate values the counter table holds now (idle ones
        are forgotten past 2048: docs/semantics.md)."""
        return self._core.imm_values() if self._core is not None else 0

    # --------------------------------------------------------------- memory

    def register(self, buf: Any, *, remote_read: bool = False) -> MemoryRegion:
        """Register a writable C-contiguous buffer (bytearray, numpy array, mmap)."""
        core = self._core_or_closed()
        if not isinstance(remote_read, (bool, int, np.bool_)):
            raise TypeError(f"remote_read must be a bool, not {type(remote_read).__name__}")
        try:
            mv = memoryview(buf)
        except TypeError:
            raise TypeError(f"buf must support the buffer protocol, not "
                            f"{type(buf).__name__}") from None
        with mv:
            if "O" in mv.format:
                # a peer writing into it would overwrite Python object pointers
                raise TypeError("buf holds Python objects (buffer format 'O'): only plain "
                                "data can be registered")
            if mv.readonly:
                raise TypeError(f"buf must be writable ({type(buf).__name__} is read-only)")
            if not mv.c_contiguous:
                raise ValueError("buf must be C-contiguous")
            if mv.nbytes == 0:
                raise ValueError("buf is empty: a region needs at least 1 byte")
            nbytes = mv.nbytes
        try:
            cmr = core.register(buf, remote_read)
        except _core.CoreError as exc:
            raise TransferError("memory registration failed", op="register", nbytes=nbytes,
                                provider_text=str(exc), code=exc.code) from None
        except BufferError as exc:
            raise TypeError(f"buf cannot be exported: {exc}") from None
        remote = RemoteRegion(self._address, cmr.nbytes,
                              tuple(cmr.key(i) for i in range(cmr.nnics)),
                              tuple(cmr.base(i) for i in range(cmr.nnics)), bool(remote_read))
        mr = MemoryRegion(self, cmr, remote, buf)
        self._regions[id(mr)] = mr
        return mr

    def deregister(self, mr: MemoryRegion) -> None:
        """Deregister; a peer holding the old descriptor can no longer write.

        Raises ``BufferError`` while operations from the region are in flight."""
        if not isinstance(mr, MemoryRegion):
            raise TypeError(f"mr must be a MemoryRegion, not {type(mr).__name__}")
        if mr._core is None:
            return
        if mr._engine is not self:
            raise ValueError("mr belongs to another engine")
        if mr._core.inflight:
            raise BufferError(f"region has {mr._core.inflight} operations in flight; await "
                              "them before deregistering")
        if self._core is not None:
            self._core.deregister(mr._core)
        mr._core = None
        mr.obj = None
        self._regions.pop(id(mr), None)

    # ---------------------------------------------------------- destinations

    def _dest(self, dst: Any, name: str = "dst") -> Any:
        """Resolve a destination (descriptor bytes, RemoteRegion, MemoryRegion)
        to a _core.Dest: peer index, remote base/key and size.  Cached."""
        try:
            d = self._dests.get(dst)
        except TypeError:  # unhashable (bytearray, memoryview)
            d = None
        if d is not None:
            return d
        if isinstance(dst, RemoteRegion):
            try:   # a RemoteRegion built by hand: its fields must survive the wire format
                region = RemoteRegion.from_bytes(dst.to_bytes())
            except Exception as exc:   # noqa: BLE001 - any malformed field
                raise ValueError(f"{name}: malformed RemoteRegion: {exc}") from None
        elif isinstance(dst, MemoryRegion):
            if dst._core is None:
                raise ValueError(f"{name}: the MemoryRegion is deregistered")
            region = dst.remote
        elif isinstance(dst, (bytes, bytearray, memoryview)):
            try:
                region = RemoteRegion.from_bytes(bytes(dst))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        else:
            raise TypeError(f"{name} must be a RemoteRegion or descriptor bytes, "
                            f"not {type(dst).__name__}")
        owner = region.owner
        peer = self._peer(owner)
        ident = (peer, region.keys, region.bases)
        did = self._dest_ids.get(ident)
        if did is None:
            try:
                did = self._core.dest_add(peer, region.bases, region.keys)
            except _core.CoreError as exc:
                raise ValueError(f"{name}: {exc}") from None
            self._dest_ids[ident] = did
        d = _core.Dest(did, peer, region.nbytes, region, str(owner))
        if isinstance(dst, (bytes, RemoteRegion)):
            if len(self._dests) >= 65536:
                self._dests.clear()
            self._dests[dst] = d
        return d

    def _peer(self, owner: EngineAddress) -> int:
        key = (owner.engine_id, owner.names)
        p = self._peers.get(key)
        if p is None:
            if owner.provider != self.provider:
                raise ValueError(f"destination engine uses provider {owner.provider!r}, "
                                 f"this engine {self.provider!r}")
            try:
                p = self._core.peer_insert(list(owner.names), owner.engine_id)
            except _core.CoreError as exc:
                raise PeerError("cannot add peer", op="connect", peer=str(owner),
                                provider_text=str(exc), code=exc.code) from None
            self._peers[key] = p
        return p

    def _src(self, src_mr: Any) -> Any:
        if not isinstance(src_mr, MemoryRegion):
            raise TypeError(f"src_mr must be a MemoryRegion, not {type(src_mr).__name__}")
        if src_mr._core is None:
            raise ValueError("src_mr is deregistered")
        if src_mr._engine is not self:
            raise ValueError("src_mr is registered with another engine")
        return src_mr._core

    def _posted(self, exc: Any, name: str, nbytes: int, peer: str | None) -> TransferError:
        if exc.code == _core.FI_ESHUTDOWN:
            return EngineClosedError("engine is closed", op=name, nbytes=nbytes, peer=peer)
        return TransferError(f"{name} could not be posted", op=name, nbytes=nbytes, peer=peer,
                             provider_text=str(exc), code=exc.code)

    # ------------------------------------------------------------ operations

    def write(self, src_mr: MemoryRegion, dst: Destination, *, length: int | None = None,
              src_offset: int = 0, dst_offset: int = 0, imm: int | None = None
              ) -> asyncio.Future:
        """Write ``length`` bytes (default: the rest of src_mr) from src_mr at
        src_offset into dst at dst_offset; deliver ``imm`` (if given) once,
        after every byte is in place.  Returns an awaitable."""
        # (a running engine's write is the futures layer's: see _fast_paths)
        self._core_or_closed()
        return self._c.write(src_mr, dst, length=length, src_offset=src_offset,
                             dst_offset=dst_offset, imm=imm)

    def write_imm(self, dst: Destination, imm: int) -> asyncio.Future:
        """Deliver only an immediate to dst's owner (a zero-byte write)."""
        self._core_or_closed()
        return self._c.write_imm(dst, imm)

    def write_paged(self, src_mr: MemoryRegion, src_pages: Any, dst: Destination,
                    dst_pages: Any, *, page_size: int, src_stride: int | None = None,
                    dst_stride: int | None = None, src_offset: int = 0, dst_offset: int = 0,
                    imm: int | None = None) -> asyncio.Future:
        """Write page src_pages[i] to page dst_pages[i], for every i.

        Page p of a side lives at ``offset + p * stride`` (stride defaults to
        page_size).  One write and, if ``imm`` is given, one immediate per page."""
        core = self._core_or_closed()
        src = self._src(src_mr)
        d = self._dest(dst)
        ps = _uint("page_size", page_size)
        if ps == 0:
            raise ValueError("page_size must be positive")
        ss = ps if src_stride is None else _uint("src_stride", src_stride)
        ds = ps if dst_stride is None else _uint("dst_stride", dst_stride)
        if ss == 0 or ds == 0:
            raise ValueError("src_stride and dst_stride must be positive")
        so = _uint("src_offset", src_offset)
        do = _uint("dst_offset", dst_offset)
        sp = _pages("src_pages", src_pages)
        dp = _pages("dst_pages", dst_pages)
        if sp.shape[0] != dp.shape[0]:
            raise ValueError(f"src_pages has {sp.shape[0]} pages but dst_pages {dp.shape[0]}")
        _check_pages("src_pages", sp, so, ss, ps, src.nbytes, "source")
        _check_pages("dst_pages", dp, do, ds, ps, d.nbytes, "destination")
        has_imm = imm is not None
        iv = _imm("imm", imm) if has_imm else 0
        rid = self._c.new_id()
        nbytes = ps * sp.shape[0]
        try:
            core.post_paged(rid, src, so, ss, sp, d.id, do, ds, dp, ps, has_imm, iv)
        except _core.CoreError as exc:
            raise self._posted(exc, "write_paged", nbytes, d.peer_name) from None
        return self._c.track(rid, src, "write_paged", nbytes, d.peer_name)

    def scatter(self, src_mr: MemoryRegion, targets: Iterable[ScatterTarget], *,
                imm: int | None = None) -> asyncio.Future:
        """Write slices of src_mr to many destinations; one immediate per target."""
        core = self._core_or_closed()
        src = self._src(src_mr)
        tl = _iterable("targets", targets)
        rows = np.empty((len(tl), 4), dtype=np.uint64)
        total = 0
        for i, t in enumerate(tl):
            if not isinstance(t, ScatterTarget):
                raise TypeError(f"targets[{i}] must be a ScatterTarget, not {type(t).__name__}")
            d = self._dest(t.dst, f"targets[{i}].dst")
            n = _uint(f"targets[{i}].length", t.length)
            so = _uint(f"targets[{i}].src_offset", t.src_offset)
            do = _uint(f"targets[{i}].dst_offset", t.dst_offset)
            if so + n > src.nbytes:
                raise ValueError(f"targets[{i}]: src_offset {so} + length {n} exceeds src_mr's "
                                 f"{src.nbytes} bytes")
            if do + n > d.nbytes:
                raise ValueError(f"targets[{i}]: dst_offset {do} + length {n} exceeds dst's "
                                 f"{d.nbytes} bytes")
            rows[i] = (d.id, so, do, n)
            total += n
        has_imm = imm is not None
        iv = _imm("imm", imm) if has_imm else 0
        return self._post_rows("scatter", core, src, rows, total, has_imm, iv)

    def barrier(self, dsts: Iterable[Destination], imm: int) -> asyncio.Future:
        """Send one immediate to the owner of each destination region."""
        core = self._core_or_closed()
        iv = _imm("imm", imm)
        dl = [self._dest(x, f"dsts[{i}]") for i, x in enumerate(_iterable("dsts", dsts))]
        rows = np.empty((len(dl), 4), dtype=np.uint64)
        for i, d in enumerate(dl):
            rows[i] = (d.id, 0, 0, 0)
        return self._post_rows("barrier", core, None, rows, 0, True, iv)

    def _post_rows(self, name: str, core: Any, src: Any, rows: np.ndarray, total: int,
                   has_imm: bool, iv: int) -> asyncio.Future:
        """Post a table of (dest id, src_off, dst_off, len) rows as one op."""
        rid = self._c.new_id()
        try:
            core.post_scatter(rid, src, rows, has_imm, iv)
        except _core.CoreError as exc:
            raise self._posted(exc, name, total, None) from None
        return self._c.track(rid, src, name, total, None)

    # ------------------------------------------------------------ immediates

    async def expect_imm(self, imm: int, count: int, *, timeout: float | None = None) -> None:
        """Wait until ``count`` immediates of value ``imm`` have arrived and
        consume them.  Arrivals before the call count; timeout -> TimeoutError."""
        self._core_or_closed()
        iv = _imm("imm", imm)
        n = _uint("count", count)
        timeout = _timeout(timeout)
        if n == 0:
            return
        c = self._c
        got = c.expect(iv, n)
        if got is None:
            return
        wid, fut = got
        c.spin(fut)   # an answer within microseconds resolves it here
        try:
            if fut.done():
                fut.result()
            elif timeout is None:
                await fut
            else:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._core.imm_credit(iv, n)   # resolved, but the caller never saw it
            else:
                c.abandon(wid)
            raise

    def imm_counter(self, imm: int) -> ImmCounter:
        self._core_or_closed()
        return ImmCounter(self, _imm("imm", imm))

    # -------------------------------------------------------------- messages

    def send(self, address: bytes | EngineAddress, data: bytes) -> asyncio.Future:
        """Send a small control message (at most msg_size bytes) to an engine."""
        core = self._core_or_closed()
        if isinstance(address, EngineAddress):
            owner = address
        elif isinstance(address, (bytes, bytearray, memoryview)):
            owner = EngineAddress.from_bytes(bytes(address))
        else:
            raise TypeError(f"address must be bytes, not {type(address).__name__}")
        try:
            payload = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
        if payload.nbytes > self._msg_size:
            raise ValueError(f"data is {payload.nbytes} bytes; messages are limited to "
                             f"msg_size={self._msg_size}")
        if owner.msg_size is not None and payload.nbytes > owner.msg_size:
            # the receiver could not take it (on shm it would even hang there)
            raise ValueError(f"data is {payload.nbytes} bytes; the receiving engine accepts "
                             f"messages of at most msg_size={owner.msg_size}")
        peer = self._peer(owner)
        rid = self._c.new_id()
        try:
            core.post_send(rid, peer, payload if payload.nbytes else b"")
        except _core.CoreError as exc:
            raise self._posted(exc, "send", payload.nbytes, str(owner)) from None
        return self._c.track(rid, None, "send", payload.nbytes, str(owner))

    async def recv(self, *, timeout: float | None = None) -> bytes:
        """Receive the next control message."""
        self._core_or_closed()
        timeout = _timeout(timeout)
        m = self._msgs
        if m.queue:
            return m.queue.popleft()
        fut = asyncio.get_running_loop().create_future()
        m.waiters.append(fut)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                m.queue.appendleft(fut.result())  # delivered, but the caller gave up
            fut.cancel()
            raise
