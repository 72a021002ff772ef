"""What a region descriptor grants, and what a peer without one can do
(docs/security.md).

Most tests use a bare libfabric peer (tests/fi_raw.c, see rawpeer.py): it
issues RMA writes and reads with any key and address, without any of the
engine's own checks, as an attacker on the fabric could.  It only talks to
the loopback engines of the test.

Complements tests/test_write.py::test_deregistered_region_is_not_written
(the old descriptor through a real engine, every provider): here the old
key from a bare peer, and re-registering the same memory, which must not
revive the old descriptor.

Measured on libfabric 1.17 and pinned here:

* keys and bounds are enforced by the target's provider: a wrong key or a
  write past the region's end changes nothing (tcp drops the connection,
  sockets answers "Permission denied");
* ``remote_read=False`` stops remote reads on sockets but NOT on
  tcp;ofi_rxm, which serves ``fi_read`` of any region whose key is known
  (xfail strict);
* keys are sequential (1, 2, ...) and tcp/sockets/udp use offset addressing
  (base 0), so a peer that knows only the engine's address can guess every
  region's key (xfail strict: passes once keys are unguessable).
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aiotransfer import TransferError

import rawpeer
from support import assert_bytes, random_bytes, settle

pytestmark = pytest.mark.timeout(120)

RAW_PROVIDERS = ["tcp", "sockets"]
IMM_FLAG = 1 << 32        # marks a user immediate in 8-byte CQ data (architecture.md)




@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_keys_and_bounds_are_enforced(make_engine, raw_peer, provider, rng, seed):
    """With the right key a bare peer writes inside the region; a wrong key
    (also for a zero-byte write that carries only an immediate) or a write
    crossing the region's end changes no byte (of this region or another)
    and delivers no immediate."""
    b = await make_engine(provider)
    one, two = random_bytes(rng, 4096), random_bytes(rng, 4096)
    m1, m2 = b.register(one), b.register(two)
    keep1, keep2 = one.copy(), two.copy()
    raw = raw_peer(provider)
    peer = await raw.peer(b.address)
    key, addr = rawpeer.target(m1.remote)

    data = random_bytes(rng, 100).tobytes()
    assert await raw.write(peer, key, addr + 10, data, cq_data=IMM_FLAG | 11) == "OK"
    await b.expect_imm(11, 1, timeout=30)
    keep1[10:110] = np.frombuffer(data, np.uint8)
    assert_bytes(one, keep1, "the write with the right key")

    used = set(m1.remote.keys) | set(m2.remote.keys)
    wrong = [k for k in (int(x) for x in rng.integers(1 << 40, 1 << 62, 4)) if k not in used]
    for k in wrong:
        r = await raw.write(peer, k, addr, b"\xee" * 64, cq_data=IMM_FLAG | 12)
        assert r != "OK", f"seed={seed}: a write with the wrong key {k} succeeded"
        # a bare immediate (zero bytes) needs a valid key too
        r = await raw.write(peer, k, addr, b"", cq_data=IMM_FLAG | 12)
        assert r != "OK", f"seed={seed}: an immediate with the wrong key {k} was taken"
    # crossing the end: starts inside, ends 8 bytes past it
    r = await raw.write(peer, key, addr + 4096 - 8, b"\xee" * 16, cq_data=IMM_FLAG | 13)
    assert r != "OK", "a write past the region's end succeeded"
    r = await raw.write(peer, key, addr + (1 << 20), b"\xee" * 16)
    assert r != "OK", "a write 1 MiB past the region's start succeeded"
    await settle(0.2)
    assert_bytes(one, keep1, "region 1 after refused writes")
    assert_bytes(two, keep2, "region 2 after refused writes")
    assert b.imm_counter(12).total == 0 and b.imm_counter(13).total == 0, \
        "a refused write delivered its immediate"
    # the engine still serves (a fresh bare peer; tcp dropped the old connection)
    raw2 = raw_peer(provider)
    p2 = await raw2.peer(b.address)
    assert await raw2.write(p2, key, addr, b"\x01\x02", cq_data=IMM_FLAG | 14) == "OK"
    await b.expect_imm(14, 1, timeout=30)
    assert one[0] == 1 and one[1] == 2


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_region_without_remote_read_is_not_readable(make_engine, raw_peer, provider,
                                                          rng, request):
    """A region registered with remote_read=True can be read remotely (the
    positive control); one registered without it cannot."""
    b = await make_engine(provider)
    secret = random_bytes(rng, 4096)
    shared = random_bytes(rng, 4096)
    m_secret, m_shared = b.register(secret), b.register(shared, remote_read=True)
    assert m_shared.remote.remote_read and not m_secret.remote.remote_read
    raw = raw_peer(provider)
    peer = await raw.peer(b.address)
    got = await raw.read(peer, *rawpeer.target(m_shared.remote, 100), 64)
    assert got == shared[100:164].tobytes(), f"reading a remote_read region: {got!r:.80}"
    got = await raw.read(peer, *rawpeer.target(m_secret.remote, 100), 64)
    assert not isinstance(got, bytes), \
        f"read {len(got)} bytes of a region registered without remote_read"


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_deregistered_key_is_dead_for_a_bare_peer(make_engine, raw_peer, provider, rng):
    """After deregister, the old key writes nothing, also from a peer that
    skips every check of the engine; registering the same memory again gives
    a new key and does not revive the old one."""
    b = await make_engine(provider)
    buf = random_bytes(rng, 8192)
    mr = b.register(buf)
    old = mr.remote
    raw = raw_peer(provider)
    peer = await raw.peer(b.address)
    assert await raw.write(peer, *rawpeer.target(old), b"\x11" * 8) == "OK"
    b.deregister(mr)
    keep = buf.copy()
    r = await raw.write(peer, *rawpeer.target(old), b"\x22" * 64, cq_data=IMM_FLAG | 21)
    assert r != "OK", "a write with a deregistered key succeeded"
    again = b.register(buf)
    assert set(again.remote.keys).isdisjoint(old.keys), "a key was reused"
    raw2 = raw_peer(provider)   # tcp drops the connection of a refused write
    p2 = await raw2.peer(b.address)
    r = await raw2.write(p2, *rawpeer.target(old), b"\x33" * 64, cq_data=IMM_FLAG | 22)
    assert r != "OK", "the old key works again after the memory was registered again"
    await settle(0.2)
    assert_bytes(buf, keep, "memory behind a deregistered key")
    assert b.imm_counter(21).total == 0 and b.imm_counter(22).total == 0
    raw3 = raw_peer(provider)
    p3 = await raw3.peer(b.address)
    assert await raw3.write(p3, *rawpeer.target(again.remote), b"\x44" * 4) == "OK"
    assert (buf[:4] == 0x44).all()


@pytest.mark.parametrize("provider", ["tcp", "sockets", "udp"])
async def test_reregistered_memory_does_not_revive_an_old_descriptor(make_engine, provider,
                                                                     rng, seed):
    """The engine path: a writer holding the descriptor of a deregistered
    region cannot write into the same memory registered again (its write
    fails, or stalls until peer_timeout on udp); a writer with the new
    descriptor can.  (shm: test_write.py's stale-descriptor test, which
    isolates it in a child process.)"""
    b = await make_engine(provider)
    a = await make_engine(provider, peer_timeout=1)
    buf = np.zeros(65536, np.uint8)
    mr = b.register(buf)
    old = mr.descriptor
    src = random_bytes(rng, 65536)
    smr = a.register(src)
    await a.write(smr, old, length=16, imm=1)
    await b.expect_imm(1, 1, timeout=30)
    b.deregister(mr)
    again = b.register(buf)
    keep = buf.copy()
    fut = a.write(smr, old, imm=2)
    try:
        await asyncio.wait_for(fut, 30)
    except TransferError:
        pass
    else:
        raise AssertionError(f"seed={seed}: a write through the old descriptor succeeded")
    # a bare immediate through the old descriptor: it may even "succeed" (a
    # zero-byte write completes once transmitted, semantics.md), but the
    # target must not count it
    fut = a.write_imm(old, 4)
    try:
        await asyncio.wait_for(fut, 30)
    except TransferError:
        pass
    await settle(0.2)
    assert_bytes(buf, keep, f"seed={seed}: memory written through the old descriptor")
    assert b.imm_counter(2).total == 0 and b.imm_counter(4).total == 0, \
        "an immediate through the old descriptor was counted"
    c = await make_engine(provider)
    await c.write(c.register(src), again.descriptor, imm=3)
    await b.expect_imm(3, 1, timeout=30)
    assert_bytes(buf, src, f"seed={seed}: the write through the new descriptor")


@pytest.mark.parametrize("provider", RAW_PROVIDERS)
async def test_keys_cannot_be_guessed(make_engine, raw_peer, provider, rng):
    """A peer with the engine's address but no descriptor tries the keys
    1..64 at the region's start: none may reach a region."""
    b = await make_engine(provider)
    bufs = [np.zeros(64, np.uint8) for _ in range(4)]
    mrs = [b.register(x) for x in bufs]
    raw = raw_peer(provider)
    peer = await raw.peer(b.address)
    base = mrs[0].remote.bases[0]   # 0 with offset addressing; a guess otherwise
    hits = []
    for key in range(1, 65):
        if await raw.write(peer, key, base, b"\x99") == "OK":
            hits.append(key)
        if len(hits) and raw.proc.poll() is not None:
            break
    await settle(0.1)
    changed = [i for i, x in enumerate(bufs) if x.any()]
    assert not hits and not changed, \
        f"guessed keys {hits} reached regions {changed} (real keys {[m.remote.keys for m in mrs]})"
