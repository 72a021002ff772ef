"""Benchmark harness: aiotransfer against the raw C libfabric reference and
against peer libraries (Mooncake Transfer Engine, NIXL), two processes per
run, same points, same verification.  ``aiotransfer bench`` runs the sweep
(:mod:`aiotransfer.bench.sweep`); docs/benchmarks.md has the conventions."""
from .backends import Backend
from .common import BenchError, Point, Unavailable

__all__ = ["Backend", "BenchError", "Point", "Unavailable"]
