"""Region descriptors and engine addresses: round trips and malformed input."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import aiotransfer
from aiotransfer import EngineAddress, RemoteRegion


@pytest.fixture
async def real(make_engine, provider):
    """A descriptor and address of a real engine of ``provider``."""
    engine = await make_engine(provider)
    mr = engine.register(bytearray(12345))
    return engine, mr


def _sample() -> RemoteRegion:
    owner = EngineAddress("tcp;ofi_rxm", 0x1122334455667788, (bytes(range(16)),))
    return RemoteRegion(owner, 4096, (42,), (0x7F0000001000,), False)


async def test_descriptor_roundtrip_of_real_region(real, provider):
    engine, mr = real
    r = RemoteRegion.from_bytes(mr.descriptor)
    assert r.nbytes == mr.nbytes == 12345
    assert r.owner == EngineAddress.from_bytes(engine.address)
    assert r.owner.provider == aiotransfer.resolve_provider(provider)
    assert r.to_bytes() == mr.descriptor
    assert RemoteRegion.from_bytes(bytearray(mr.descriptor)) == r
    assert RemoteRegion.from_bytes(memoryview(mr.descriptor)) == r
    assert EngineAddress.from_bytes(engine.address).to_bytes() == engine.address


def test_descriptor_roundtrip_synthetic():
    r = _sample()
    assert RemoteRegion.from_bytes(r.to_bytes()) == r
    rr = RemoteRegion(r.owner, 1, r.keys, r.bases, True)
    assert RemoteRegion.from_bytes(rr.to_bytes()).remote_read is True


def test_descriptor_truncated_at_every_length():
    b = _sample().to_bytes()
    for n in range(len(b)):
        with pytest.raises(ValueError):
            RemoteRegion.from_bytes(b[:n])


def test_descriptor_trailing_bytes():
    with pytest.raises(ValueError):
        RemoteRegion.from_bytes(_sample().to_bytes() + b"\0")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_descriptor_unknown_version(version):
    b = bytearray(_sample().to_bytes())
    b[4] = version
    with pytest.raises(ValueError, match="version"):
        RemoteRegion.from_bytes(bytes(b))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_owner_address_unknown_version(version):
    b = bytearray(_sample().to_bytes())
    b[20 + 4] = version  # descriptor header is 20 bytes, then the owner address
    with pytest.raises(ValueError, match="version"):
        RemoteRegion.from_bytes(bytes(b))


def test_descriptor_bad_magic_flags_and_nic_count():
    good = _sample().to_bytes()
    bad_magic = b"XXXX" + good[4:]
    with pytest.raises(ValueError, match="magic"):
        RemoteRegion.from_bytes(bad_magic)
    b = bytearray(good)
    b[5] = 0x80
    with pytest.raises(ValueError, match="flags"):
        RemoteRegion.from_bytes(bytes(b))
    for nnics in (0, 2, 17, 0xFFFF):
        b = bytearray(good)
        struct.pack_into("<H", b, 6, nnics)
        with pytest.raises(ValueError):
            RemoteRegion.from_bytes(bytes(b))


def test_descriptor_wrapping_region():
    r = _sample()
    wrap = RemoteRegion(r.owner, 2 ** 64 - 4096, r.keys, (8192,), False)
    with pytest.raises(ValueError):
        RemoteRegion.from_bytes(wrap.to_bytes())


def test_address_is_not_a_descriptor_and_vice_versa():
    r = _sample()
    with pytest.raises(ValueError):
        RemoteRegion.from_bytes(r.owner.to_bytes())
    with pytest.raises(ValueError):
        EngineAddress.from_bytes(r.to_bytes())


def test_address_truncated_at_every_length():
    a = _sample().owner.to_bytes()
    for n in range(len(a)):
        with pytest.raises(ValueError):
            EngineAddress.from_bytes(a[:n])
    with pytest.raises(ValueError):
        EngineAddress.from_bytes(a + b"x")


def test_address_bad_provider_name_and_name_lengths():
    a = bytearray(_sample().owner.to_bytes())
    a[16 + 1] = 0xFF  # first byte of the provider name: invalid utf-8
    with pytest.raises(ValueError):
        EngineAddress.from_bytes(bytes(a))
    for name in (b"", b"x" * 257):
        with pytest.raises(ValueError):
            EngineAddress.from_bytes(EngineAddress("tcp", 1, (name,)).to_bytes())


def test_garbage_descriptors(seed):
    rng = np.random.default_rng(seed)
    for n in [0, 1, 3, 19, 20, 21, 64, 100, 1000]:
        for _ in range(20):
            g = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            with pytest.raises(ValueError):
                RemoteRegion.from_bytes(g)
            with pytest.raises(ValueError):
                EngineAddress.from_bytes(g)
            # a right magic and version in front of garbage is still garbage
            with pytest.raises(ValueError):
                RemoteRegion.from_bytes(b"ATXR\x01" + g)


def test_mutated_descriptors_parse_or_raise_value_error(seed):
    """Flip random bytes of a valid descriptor: the parser either accepts the
    result or raises ValueError -- never any other exception."""
    rng = np.random.default_rng(seed)
    good = bytearray(_sample().to_bytes())
    for _ in range(3000):
        b = bytearray(good)
        for pos in rng.integers(0, len(b), int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(b) - 8, len(b) + 1))
        try:
            r = RemoteRegion.from_bytes(bytes(b[:cut]))
        except ValueError:
            continue
        # accepted: what it parsed to must survive a round trip
        assert RemoteRegion.from_bytes(r.to_bytes()) == r, \
            f"seed={seed}: accepted {bytes(b[:cut]).hex()}"


def test_address_unknown_flags():
    """The address header has a flags byte that version 1 writes as 0; like
    the descriptor's flags, unknown bits must be rejected, not ignored."""
    a = bytearray(_sample().owner.to_bytes())
    a[5] = 0x02       # bit 0 is "msg_size follows"; others are unknown
    with pytest.raises(ValueError, match="flags"):
        EngineAddress.from_bytes(bytes(a))
    a[5] = 0x01       # says msg_size follows, but it does not
    with pytest.raises(ValueError, match="msg_size"):
        EngineAddress.from_bytes(bytes(a))
    with_size = EngineAddress("tcp;ofi_rxm", 7, (b"x" * 16,), 4096)
    assert EngineAddress.from_bytes(with_size.to_bytes()) == with_size
    d = bytearray(_sample().to_bytes())
    d[20 + 5] = 0x02  # the owner address inside a descriptor
    with pytest.raises(ValueError, match="flags"):
        RemoteRegion.from_bytes(bytes(d))


@pytest.mark.parametrize("bad", [None, 123, "ATXR", [1, 2, 3]])
def test_non_bytes_descriptor_is_type_error(bad):
    with pytest.raises(TypeError, match="descriptor"):
        RemoteRegion.from_bytes(bad)
