"""aiotransfer: asyncio one-sided RDMA point-to-point transfers for LLM systems.

WriteImm (a one-sided write carrying a 32-bit immediate) and ImmCounter (the
receiver counts immediates per value) over libfabric, driven by a C progress
worker.  See docs/ for semantics and architecture.
"""
from ._wire import EngineAddress, RemoteRegion
from .engine import (ImmCounter, MemoryRegion, NicInfo, PROVIDER_ALIASES, ScatterTarget,
                     TransferEngine, resolve_provider)
from .errors import EngineClosedError, PeerError, TransferError
from .memory import alloc

__version__ = "0.1.0"

__all__ = [
    "TransferEngine", "MemoryRegion", "RemoteRegion", "EngineAddress", "ImmCounter",
    "ScatterTarget", "NicInfo", "TransferError", "EngineClosedError", "PeerError",
    "PROVIDER_ALIASES", "resolve_provider", "alloc", "__version__",
]
