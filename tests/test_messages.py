"""engine.send / engine.recv control messages."""
from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest

from aiotransfer import EngineAddress

from support import random_bytes, settle, wait_until

MSG_SIZE = 65536


async def test_send_recv_empty_small_and_max(pair, rng):
    a, b = pair
    payloads = [b"", b"x", random_bytes(rng, 1000).tobytes(), random_bytes(rng, MSG_SIZE).tobytes()]
    for p in payloads:
        assert await a.send(b.address, p) is None
        got = await b.recv(timeout=30)
        assert type(got) is bytes
        assert got == p, f"{len(got)} B received for a {len(p)} B message"
    # and the other way round, all in flight together
    await asyncio.gather(*[b.send(a.address, p) for p in payloads])
    got = [await a.recv(timeout=30) for _ in payloads]
    assert sorted(got) == sorted(payloads)


async def test_oversize_message_is_value_error(make_engine, provider):
    a = await make_engine(provider)
    b = await make_engine(provider)
    with pytest.raises(ValueError, match="data"):
        a.send(b.address, bytes(MSG_SIZE + 1))
    small = await make_engine(provider, msg_size=100)
    await small.send(b.address, bytes(range(100)))
    assert await b.recv(timeout=30) == bytes(range(100))
    with pytest.raises(ValueError, match="data"):
        small.send(b.address, bytes(101))
    await settle()
    assert b.stats()[0]["msgs_received"] == 1, "a rejected message must not be sent"


async def test_many_messages(pair, rng, seed):
    """More messages than posted receive buffers (64), random sizes 0 .. max;
    each one arrives exactly once and intact."""
    a, b = pair
    sizes = [0, MSG_SIZE] + [int(x) for x in rng.integers(0, 2048, 298)]
    payloads = [i.to_bytes(4, "little") + random_bytes(rng, max(n - 4, 0)).tobytes()
                if n >= 4 else bytes(n) for i, n in enumerate(sizes)]
    await asyncio.gather(*[a.send(b.address, p) for p in payloads])
    got = [await b.recv(timeout=30) for _ in payloads]
    assert collections.Counter(got) == collections.Counter(payloads), f"seed={seed}"
    with pytest.raises(TimeoutError):
        await b.recv(timeout=0.05)


async def test_bytes_like_payloads_and_address_forms(pair, rng):
    a, b = pair
    data = random_bytes(rng, 800)
    forms = [bytearray(data.tobytes()), memoryview(data.tobytes()), data,
             data.view(np.uint32)[:77]]
    for f in forms:
        await a.send(b.address, f)
        assert await b.recv(timeout=30) == bytes(memoryview(f).cast("B"))
    await a.send(EngineAddress.from_bytes(b.address), b"by EngineAddress")
    assert await b.recv(timeout=30) == b"by EngineAddress"
    await a.send(bytearray(b.address), b"by bytearray")
    assert await b.recv(timeout=30) == b"by bytearray"


async def test_recv_waits_and_timeout(pair):
    a, b = pair
    with pytest.raises(TimeoutError):
        await b.recv(timeout=0.05)
    task = asyncio.create_task(b.recv())
    await asyncio.sleep(0.02)
    assert not task.done()
    await a.send(b.address, b"late")
    assert await asyncio.wait_for(task, 30) == b"late"


async def test_cancelled_recv_loses_no_message(pair):
    a, b = pair
    for i in range(20):
        task = asyncio.create_task(b.recv())
        await asyncio.sleep(0)
        fut = a.send(b.address, b"m%d" % i)
        # let the message arrive in the worker, then cancel before the loop
        # has necessarily handed it to the task
        await wait_until(lambda: b.stats()[0]["msgs_received"] == i + 1, 30, "message")
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            got = await b.recv(timeout=30)
        assert got == b"m%d" % i
        await fut
    with pytest.raises(TimeoutError):
        await b.recv(timeout=0.05)


async def test_messages_and_writes_interleaved(pair, rng, seed):
    a, b = pair
    src = random_bytes(rng, 100_000)
    dst = np.zeros(100_000, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    futs = []
    for i in range(100):
        futs.append(a.write(smr, dmr.descriptor, length=1000, src_offset=i * 1000,
                            dst_offset=i * 1000, imm=1))
        futs.append(a.send(b.address, b"%d" % i))
    await asyncio.gather(*futs)
    got = {await b.recv(timeout=30) for _ in range(100)}
    assert got == {b"%d" % i for i in range(100)}
    await b.expect_imm(1, 100, timeout=30)
    assert (dst == src).all(), f"seed={seed}"


async def test_recv_queue_limit_drops_and_counts(make_engine, provider):
    a = await make_engine(provider)
    b = await make_engine(provider, recv_queue_limit=5)
    await asyncio.gather(*[a.send(b.address, b"q%d" % i) for i in range(12)])
    await wait_until(lambda: b.stats()[0]["msgs_received"] == 12, 30, "12 messages")
    await asyncio.sleep(0.05)
    got = [await b.recv(timeout=5) for _ in range(5)]
    assert len(set(got)) == 5 and all(g.startswith(b"q") for g in got)
    with pytest.raises(TimeoutError):
        await b.recv(timeout=0.05)
    assert b.dropped_messages == 7
