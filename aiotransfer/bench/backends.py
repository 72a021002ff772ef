"""Backends of the harness, named ``kind:transport[:style]``.

| spec | what |
|---|---|
| ``aiotransfer:shm``, ``aiotransfer:tcp`` | single writes (``engine.write``, one future each) |
| ``aiotransfer:<t>:paged`` | ``write_paged`` calls |
| ``aiotransfer:<t>:await`` | one awaitable per write, awaited where it is issued |
| ``aiotransfer:<t>:pipeline`` | one awaitable per write, the oldest awaited when the window is full |
| ``aiotransfer:<t>:pipeline-uvloop`` | the same, both processes on uvloop's event loop |
| ``raw:shm``, ``raw:tcp`` (``:paged``) | the C libfabric reference (fi_rawbench.c) |
| ``mooncake:tcp`` | Mooncake Transfer Engine, tcp transport, P2P handshake metadata |
| ``nixl:tcp``, ``nixl:shm`` (``:pthread``) | NIXL, UCX backend over tcp / shared memory |

Peers (mooncake, nixl) are optional: without them the backend reports
"unavailable: <reason>" and the harness goes on.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property

from .common import UVLOOP_SUFFIX, Point, Unavailable, measure_idle, run_pair, summarize

KINDS = {
    "aiotransfer": {"module": "aio", "styles": ("write", "await", "pipeline", "paged",
                                                "pipeline-uvloop"),
                    "transports": ("shm", "tcp", "udp", "sockets")},
    "raw": {"module": "raw", "styles": ("write", "paged"),
            "transports": ("shm", "tcp", "udp", "sockets")},
    "mooncake": {"module": "mooncake", "styles": ("batch",), "transports": ("tcp",)},
    "nixl": {"module": "nixl", "styles": ("poll", "pthread"), "transports": ("tcp", "shm")},
}
RAW_PROVIDERS = {"shm": "shm", "tcp": "tcp;ofi_rxm", "udp": "udp;ofi_rxd", "sockets": "sockets"}
NAMES = {"aiotransfer": "aiotransfer", "raw": "raw C", "mooncake": "Mooncake",
         "nixl": "NIXL UCX"}


@dataclass(frozen=True)
class Backend:
    kind: str
    transport: str
    style: str

    @classmethod
    def parse(cls, spec: str) -> "Backend":
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[0] not in KINDS:
            raise ValueError(f"backend {spec!r}: expected kind:transport[:style], kind one of "
                             f"{', '.join(KINDS)}")
        info = KINDS[parts[0]]
        style = parts[2] if len(parts) == 3 else info["styles"][0]
        if parts[1] not in info["transports"]:
            raise ValueError(f"backend {spec!r}: transport one of {', '.join(info['transports'])}")
        if style not in info["styles"]:
            raise ValueError(f"backend {spec!r}: style one of {', '.join(info['styles'])}")
        return cls(parts[0], parts[1], style)

    @property
    def spec(self) -> str:
        default = KINDS[self.kind]["styles"][0]
        return f"{self.kind}:{self.transport}" + ("" if self.style == default else f":{self.style}")

    @property
    def label(self) -> str:
        default = KINDS[self.kind]["styles"][0]
        extra = "" if self.style == default else f" {self.style}"
        return f"{NAMES[self.kind]} {self.transport}{extra}"

    @cached_property
    def module(self):
        return importlib.import_module(f"aiotransfer.bench.{KINDS[self.kind]['module']}")

    def unavailable(self) -> str | None:
        """None if the backend can run here, else the exact reason."""
        if self.style.endswith(UVLOOP_SUFFIX):
            try:
                importlib.import_module("uvloop")
            except ImportError:
                return "uvloop is not installed (pip install uvloop)"
        try:
            return self.module.unavailable(self.transport)
        except Unavailable as exc:
            return str(exc)
        except Exception as exc:   # noqa: BLE001 -- an import error of a peer, say
            return f"{type(exc).__name__}: {exc}"

    def _cfg(self, point: Point | None) -> dict:
        return {"transport": self.transport, "style": self.style,
                "point": point.as_dict() if point else None}

    def _env(self) -> dict:
        fn = getattr(self.module, "env", None)
        return fn(self.transport, self.style) if fn else {}

    def run(self, point: Point, timeout: float = 300.0, quiet: bool = True) -> dict:
        """One two-process run of `point`; the metrics (see common.summarize)."""
        if self.kind == "raw":
            return self.module.run_point(RAW_PROVIDERS[self.transport], self.style, point,
                                         timeout)
        server, client = run_pair(self.module.server_main, self.module.client_main,
                                  self._cfg(point), env=self._env(), timeout=timeout,
                                  quiet=quiet)
        return summarize(point, server, client)

    def idle(self, seconds: float = 5.0, quiet: bool = True) -> float | None:
        """Percent of a core of an open idle engine (None: not meaningful)."""
        opener = getattr(self.module, "idle_main", None)
        if opener is None:
            return None
        return measure_idle(opener, self._cfg(None), env=self._env(), seconds=seconds,
                            quiet=quiet)

    def versions(self) -> dict:
        fn = getattr(self.module, "versions", None)
        return fn() if fn else {}
