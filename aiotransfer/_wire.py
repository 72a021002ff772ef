"""Binary formats of engine addresses and region descriptors (version 1).

Both are length-checked; anything malformed raises ``ValueError``.

Engine address::

    b"ATXA" | u8 version=1 | u8 flags | u16 nnics | u64 engine_id |
    u8 len + provider name (utf-8) | nnics * (u16 len + raw endpoint name) |
    [flags bit0: u32 msg_size -- the largest control message it accepts]

Region descriptor::

    b"ATXR" | u8 version=1 | u8 flags (bit0 remote_read) | u16 nnics |
    u64 nbytes | u32 len + engine address | nnics * (u64 key | u64 base)

``base`` is what the owner's NIC expects as the remote address of byte 0:
the virtual address under FI_MR_VIRT_ADDR, else 0 (offset addressing).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields

__all__ = ["EngineAddress", "RemoteRegion", "MAX_NICS"]

MAX_NICS = 16
MAX_NAME = 256
_ADDR_MAGIC = b"ATXA"
_DESC_MAGIC = b"ATXR"
_VERSION = 1
_ADDR_HEAD = struct.Struct("<4sBBHQ")
_DESC_HEAD = struct.Struct("<4sBBHQI")
_NIC = struct.Struct("<QQ")


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} must be bytes, not {type(data).__name__}")


def _cached_hash(obj: object) -> int:
    """Hash of a frozen dataclass's fields, computed once (descriptors and
    addresses are dictionary keys on every write's path)."""
    h = obj.__dict__.get("_hash")
    if h is None:
        h = hash(tuple(getattr(obj, f.name) for f in fields(obj)))
        object.__setattr__(obj, "_hash", h)
    return h


def _state_without_hash(obj: object) -> dict:
    """Pickled state: the fields only (str/bytes hashes differ per process)."""
    return {k: v for k, v in obj.__dict__.items() if k != "_hash"}


@dataclass(frozen=True)
class EngineAddress:
    """Everything a peer needs to reach an engine: provider and one name per NIC."""

    __hash__ = _cached_hash
    __getstate__ = _state_without_hash

    provider: str
    engine_id: int
    names: tuple[bytes, ...]
    #: the largest control message the engine accepts (None: not said)
    msg_size: int | None = None

    def to_bytes(self) -> bytes:
        prov = self.provider.encode()
        flags = 0 if self.msg_size is None else 1
        out = [_ADDR_HEAD.pack(_ADDR_MAGIC, _VERSION, flags, len(self.names), self.engine_id),
               bytes([len(prov)]), prov]
        for n in self.names:
            out.append(struct.pack("<H", len(n)))
            out.append(n)
        if self.msg_size is not None:
            out.append(struct.pack("<I", self.msg_size))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: object) -> "EngineAddress":
        addr, used = cls._parse(_as_bytes(data, "address"), 0)
        if used != len(data):  # type: ignore[arg-type]
            raise ValueError(f"address has {len(data) - used} trailing bytes")  # type: ignore
        return addr

    @classmethod
    def _parse(cls, b: bytes, pos: int) -> tuple["EngineAddress", int]:
        if len(b) - pos < _ADDR_HEAD.size + 1:
            raise ValueError(f"address truncated: {len(b) - pos} bytes, "
                             f"header needs {_ADDR_HEAD.size + 1}")
        magic, ver, flags, nnics, eid = _ADDR_HEAD.unpack_from(b, pos)
        if magic != _ADDR_MAGIC:
            raise ValueError(f"not an aiotransfer engine address (magic {magic!r})")
        if ver != _VERSION:
            raise ValueError(f"unknown engine address version {ver} (this build reads 1)")
        if flags & ~1:
            raise ValueError(f"engine address has unknown flags {flags:#x}")
        if not 1 <= nnics <= MAX_NICS:
            raise ValueError(f"address lists {nnics} NICs (1..{MAX_NICS} allowed)")
        pos += _ADDR_HEAD.size
        plen = b[pos]
        pos += 1
        if plen == 0 or len(b) - pos < plen:
            raise ValueError("address truncated in provider name")
        try:
            prov = b[pos:pos + plen].decode()
        except UnicodeDecodeError:
            raise ValueError("address provider name is not utf-8") from None
        pos += plen
        names = []
        for i in range(nnics):
            if len(b) - pos < 2:
                raise ValueError(f"address truncated at NIC {i}")
            (n,) = struct.unpack_from("<H", b, pos)
            pos += 2
            if n == 0 or n > MAX_NAME or len(b) - pos < n:
                raise ValueError(f"address NIC {i}: bad name length {n}")
            names.append(b[pos:pos + n])
            pos += n
        msg_size = None
        if flags & 1:
            if len(b) - pos < 4:
                raise ValueError("address truncated in msg_size")
            (msg_size,) = struct.unpack_from("<I", b, pos)
            pos += 4
        return cls(prov, eid, tuple(names), msg_size), pos

    def __str__(self) -> str:
        return f"{self.provider}/{self.engine_id:016x}"


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's registered region: what a writer needs (a capability, see docs)."""

    __hash__ = _cached_hash
    __getstate__ = _state_without_hash

    owner: EngineAddress
    nbytes: int
    keys: tuple[int, ...]
    bases: tuple[int, ...]
    remote_read: bool = False

    def to_bytes(self) -> bytes:
        ab = self.owner.to_bytes()
        out = [_DESC_HEAD.pack(_DESC_MAGIC, _VERSION, 1 if self.remote_read else 0,
                               len(self.keys), self.nbytes, len(ab)), ab]
        out.extend(_NIC.pack(k, b) for k, b in zip(self.keys, self.bases))
        return b"".join(out)

    @property
    def descriptor(self) -> bytes:
        return self.to_bytes()

    @classmethod
    def from_bytes(cls, data: object) -> "RemoteRegion":
        b = _as_bytes(data, "descriptor")
        if len(b) < _DESC_HEAD.size:
            raise ValueError(f"descriptor truncated: {len(b)} bytes, header needs "
                             f"{_DESC_HEAD.size}")
        magic, ver, flags, nnics, nbytes, alen = _DESC_HEAD.unpack_from(b, 0)
        if magic != _DESC_MAGIC:
            raise ValueError(f"not an aiotransfer region descriptor (magic {magic!r})")
        if ver != _VERSION:
            raise ValueError(f"unknown descriptor version {ver} (this build reads 1)")
        if flags & ~1:
            raise ValueError(f"descriptor has unknown flags {flags:#x}")
        if not 1 <= nnics <= MAX_NICS:
            raise ValueError(f"descriptor lists {nnics} NICs (1..{MAX_NICS} allowed)")
        pos = _DESC_HEAD.size
        if len(b) - pos < alen:
            raise ValueError("descriptor truncated in owner address")
        owner, end = EngineAddress._parse(b[:pos + alen], pos)
        if end != pos + alen:
            raise ValueError("descriptor owner address has trailing bytes")
        if len(owner.names) != nnics:
            raise ValueError(f"descriptor has {nnics} keys but its owner {len(owner.names)} NICs")
        pos = end
        need = nnics * _NIC.size
        if len(b) - pos != need:
            raise ValueError(f"descriptor key table is {len(b) - pos} bytes, expected {need}")
        keys, bases = [], []
        for i in range(nnics):
            k, base = _NIC.unpack_from(b, pos + i * _NIC.size)
            keys.append(k)
            bases.append(base)
        if bases and any(base + nbytes >= 1 << 64 for base in bases):
            raise ValueError("descriptor region wraps the address space")
        return cls(owner, nbytes, tuple(keys), tuple(bases), bool(flags & 1))
