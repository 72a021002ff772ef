"""aiotransfer side of the core benchmark: a thin entry point of the harness.

The code is aiotransfer/bench/aio.py (styles, timing, verification: see
there and docs/benchmarks.md).  ``run_aio`` keeps the old call shape:

    run_aio(provider, mode, size, window, iters, pages=None) -> dict

mode ``bw``/``rate``: one ``engine.write`` per write; ``paged``:
``write_paged`` calls of ``pages`` pages; ``lat``: 8-byte ping-pong.
Run as a script: four points on one provider, one JSON line each.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiotransfer.bench import Backend, Point  # noqa: E402

SHORT = {"tcp;ofi_rxm": "tcp", "udp;ofi_rxd": "udp"}


def run_aio(provider: str, mode: str, size: int, window: int, iters: int, *,
            pages: int | None = None, warmup: int | None = None, timeout: float = 300) -> dict:
    style = "paged" if mode == "paged" else "write"
    point = Point("rate" if mode == "paged" else mode, size, window, iters, pages=pages,
                  warmup=warmup)
    return Backend("aiotransfer", SHORT.get(provider, provider), style).run(point, timeout)


def idle_cpu(provider: str, seconds: float = 5.0) -> float | None:
    """Percent of one core used by an open, idle engine."""
    return Backend("aiotransfer", SHORT.get(provider, provider), "write").idle(seconds)


if __name__ == "__main__":
    prov = sys.argv[1] if len(sys.argv) > 1 else "shm"
    for mode, size, window, iters, pages in [("bw", 65536, 64, 20000, None),
                                             ("rate", 8, 64, 100000, None),
                                             ("paged", 8, 4096, 400000, 1024),
                                             ("lat", 8, 1, 2000, None)]:
        print(json.dumps(run_aio(prov, mode, size, window, iters, pages=pages)), flush=True)
    os._exit(0)
