"""The exception hierarchy.

Transport failures are :class:`TransferError`; misuse (bad arguments) is
``TypeError``/``ValueError`` raised before anything is posted to a NIC.
"""
from __future__ import annotations

__all__ = ["TransferError", "EngineClosedError", "PeerError"]


class TransferError(Exception):
    """Something the transport reported.

    Attributes: ``op`` (operation name), ``nbytes`` (payload of the operation),
    ``peer`` (the peer engine's address, hex, or None), ``provider_text`` (the
    provider's own error text) and ``code`` (negative libfabric errno or 0).
    """

    def __init__(self, message: str, *, op: str | None = None, nbytes: int | None = None,
                 peer: str | None = None, provider_text: str | None = None,
                 code: int = 0) -> None:
        self.op = op
        self.nbytes = nbytes
        self.peer = peer
        self.provider_text = provider_text
        self.code = code
        parts = [message]
        if op is not None:
            parts.append(f"op={op}")
        if nbytes is not None:
            parts.append(f"nbytes={nbytes}")
        if peer is not None:
            parts.append(f"peer={peer}")
        if provider_text:
            parts.append(f"provider: {provider_text}")
        super().__init__("; ".join(parts))


class EngineClosedError(TransferError):
    """The engine is closed (or closed while the operation was in flight)."""


class PeerError(TransferError):
    """A peer could not be reached or added."""
