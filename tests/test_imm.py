"""Immediate counting: expect_imm, ImmCounter, timeouts, cancellation, scale."""
from __future__ import annotations

import asyncio
import time

import pytest

import aiotransfer
from support import assert_bytes, random_bytes, settle, wait_arrivals, wait_until


@pytest.fixture
async def link(pair):
    """(sender, receiver, descriptor of a region at the receiver)."""
    a, b = pair
    dmr = b.register(bytearray(64))
    return a, b, dmr.descriptor


def _spin_until(predicate, timeout: float = 30.0) -> None:
    """Busy-wait WITHOUT yielding to the event loop (so no completion record
    is dispatched meanwhile)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out spinning"
        time.sleep(0.0002)


async def test_arrivals_before_the_call_count(link):
    a, b, d = link
    c = b.imm_counter(1)
    for _ in range(3):
        await a.write_imm(d, 1)
    await wait_arrivals(c, 3)
    assert (c.value, c.total) == (3, 3)
    await b.expect_imm(1, 3, timeout=0)  # already there: no waiting at all
    assert (c.value, c.total) == (0, 3)


async def test_arrivals_after_the_call(link):
    a, b, d = link
    c = b.imm_counter(2)
    task = asyncio.create_task(b.expect_imm(2, 3))
    await asyncio.sleep(0.05)
    assert not task.done()
    await a.write_imm(d, 2)
    await a.write_imm(d, 2)
    await wait_arrivals(c, 2)
    await asyncio.sleep(0.05)
    assert not task.done(), "waiter fired after 2 of 3 arrivals"
    await a.write_imm(d, 2)
    await asyncio.wait_for(task, 30)
    assert (c.value, c.total) == (0, 3)


async def test_arrivals_before_and_after(link):
    a, b, d = link
    c = b.imm_counter(3)
    await asyncio.gather(a.write_imm(d, 3), a.write_imm(d, 3))
    await wait_arrivals(c, 2)
    task = asyncio.create_task(b.expect_imm(3, 4, timeout=30))
    await asyncio.sleep(0.02)
    assert not task.done()
    await asyncio.gather(a.write_imm(d, 3), a.write_imm(d, 3))
    await task
    assert (c.value, c.total) == (0, 4)


async def test_successive_expects_consume(link):
    """Two successive expect_imm(imm, 3) need six arrivals."""
    a, b, d = link
    c = b.imm_counter(4)
    for _ in range(5):
        await a.write_imm(d, 4)
    await wait_arrivals(c, 5)
    await b.expect_imm(4, 3, timeout=10)
    assert c.value == 2
    with pytest.raises(TimeoutError):
        await b.expect_imm(4, 3, timeout=0.2)
    assert c.value == 2, "a timed-out waiter must not consume arrivals"
    await a.write_imm(d, 4)
    await b.expect_imm(4, 3, timeout=10)
    assert (c.value, c.total) == (0, 6)


async def test_timeout_is_builtin_timeout_error(link):
    a, b, d = link
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        await b.expect_imm(5, 1, timeout=0.1)
    assert type(info.value) is TimeoutError or isinstance(info.value, TimeoutError)
    assert 0.09 <= time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError):
        await b.expect_imm(5, 1, timeout=0)
    with pytest.raises(TimeoutError):
        await b.imm_counter(5).wait(1, timeout=0.05)
    # the engine still counts normally afterwards
    await a.write_imm(d, 5)
    await b.expect_imm(5, 1, timeout=10)


async def test_count_zero_returns_at_once(link):
    _, b, _ = link
    await asyncio.wait_for(b.expect_imm(6, 0), 1)
    assert b.imm_counter(6).total == 0


async def test_cancelled_waiter_loses_no_arrivals(link):
    a, b, d = link
    c = b.imm_counter(7)
    task = asyncio.create_task(b.expect_imm(7, 5))
    for _ in range(3):
        await a.write_imm(d, 7)
    await wait_arrivals(c, 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.value == 3
    await asyncio.gather(a.write_imm(d, 7), a.write_imm(d, 7))
    await b.expect_imm(7, 5, timeout=10)
    assert (c.value, c.total) == (0, 5)


async def test_cancel_after_waiter_fired_but_before_dispatch(link):
    """The waiter fires in the progress worker, but the loop has not seen the
    record yet when the task is cancelled: the arrivals must come back."""
    a, b, d = link
    c = b.imm_counter(8)
    for round_ in range(5):
        task = asyncio.create_task(b.expect_imm(8, 2))
        await asyncio.sleep(0)  # the waiter is queued now
        await asyncio.sleep(0.01)
        assert not task.done()
        w1, w2 = a.write_imm(d, 8), a.write_imm(d, 8)
        # block the loop: the sender's completions and the receiver's waiter
        # record pile up undispatched while the worker threads run on
        _spin_until(lambda: c.total == 2 * (round_ + 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.gather(w1, w2)
        await asyncio.sleep(0.01)
        assert c.value == 2, f"round {round_}: the cancelled waiter swallowed arrivals"
        await b.expect_imm(8, 2, timeout=5)
        assert c.value == 0


async def test_cancel_and_timeout_races_keep_the_books(link, rng, seed):
    """Random cancel / timeout / success interleavings: every arrival is
    consumed by a waiter that returned normally, or is still available."""
    a, b, d = link
    c = b.imm_counter(9)
    sent = consumed = 0
    outcomes = {"ok": 0, "cancelled": 0, "timeout": 0}
    for i in range(150):
        k = int(rng.integers(1, 4))
        timeout = None if rng.random() < 0.5 else float(rng.choice([0.0, 0.0005, 0.002]))
        task = asyncio.create_task(b.expect_imm(9, k, timeout=timeout))
        n = int(rng.integers(0, k + 2))
        writes = [a.write_imm(d, 9) for _ in range(n)]
        sent += n
        for _ in range(int(rng.integers(0, 4))):
            await asyncio.sleep(0)
        if rng.random() < 0.3:
            await asyncio.sleep(float(rng.random()) * 0.002)
        if rng.random() < 0.3:
            _spin_until(lambda: c.total >= sent - n + min(n, 1), timeout=30)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        except TimeoutError:
            outcomes["timeout"] += 1
        else:
            consumed += k
            outcomes["ok"] += 1
        await asyncio.gather(*writes)
    await wait_arrivals(c, sent)
    await asyncio.sleep(0.05)
    assert c.total == sent
    assert c.value == sent - consumed, f"seed={seed} {outcomes}: sent {sent}, consumed {consumed}"
    await b.expect_imm(9, sent - consumed, timeout=0)
    assert c.value == 0


async def test_concurrent_waiters_share_arrivals(link):
    a, b, d = link
    c = b.imm_counter(10)
    tasks = [asyncio.create_task(b.expect_imm(10, k, timeout=30)) for k in (2, 1, 3)]
    await asyncio.sleep(0.01)
    await asyncio.gather(*[a.write_imm(d, 10) for _ in range(6)])
    await asyncio.gather(*tasks)
    assert (c.value, c.total) == (0, 6)


async def test_waiters_first_come_first_served(link):
    """A later, smaller waiter does not overtake an earlier one (docs/semantics.md)."""
    a, b, d = link
    c = b.imm_counter(15)
    first = asyncio.create_task(b.expect_imm(15, 2, timeout=30))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(b.expect_imm(15, 1, timeout=30))
    await asyncio.sleep(0.01)
    await a.write_imm(d, 15)
    await wait_arrivals(c, 1)
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done(), "the second waiter overtook the first"
    await a.write_imm(d, 15)
    await asyncio.wait_for(first, 30)
    await asyncio.sleep(0.05)
    assert not second.done()
    await a.write_imm(d, 15)
    await asyncio.wait_for(second, 30)
    assert (c.value, c.total) == (0, 3)


async def test_imm_counter(link):
    a, b, d = link
    c = b.imm_counter(11)
    assert c.imm == 11
    assert (c.value, c.total) == (0, 0)
    for _ in range(4):
        await a.write_imm(d, 11)
    await wait_arrivals(c, 4)
    assert c.value == 4
    await c.wait(3)
    assert (c.value, c.total) == (1, 4)
    waiter = asyncio.create_task(c.wait(2))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await a.write_imm(d, 11)
    await asyncio.wait_for(waiter, 10)
    assert (c.value, c.total) == (0, 5)
    assert b.imm_counter(11).total == 5  # counters are views of one count
    assert b.imm_counter(12).total == 0


async def test_many_distinct_immediates(link, rng, seed):
    """1000 distinct immediate values (sequential, random, and sharing low bits)
    each counted on its own."""
    a, b, d = link
    values = set(range(300)) | {int(x) for x in rng.integers(0, 2 ** 32, 400)}
    values |= {k << 20 for k in range(1, 300)}
    values = sorted(values)
    waiters = [asyncio.create_task(b.expect_imm(v, 2, timeout=60)) for v in values[::2]]
    futs = [a.write_imm(d, v) for v in values for _ in range(2)]
    await asyncio.gather(*futs)
    await asyncio.gather(*waiters)
    await settle()
    for i, v in enumerate(values):
        c = b.imm_counter(v)
        want = (0, 2) if i % 2 == 0 else (2, 2)
        assert (c.value, c.total) == want, f"seed={seed} imm {v}"
    assert b.stats()[0]["imms_received"] == 2 * len(values)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tx_depth", [None, 2], ids=["default-depth", "tx_depth=2"])
async def test_ten_thousand_concurrent_writes(make_engine, provider, rng, seed, tx_depth):
    """10,000 writes in flight together (asyncio.gather); exact immediate
    counts per value and every byte checked.  With tx_depth=2 nearly all of
    them queue behind the provider."""
    kwargs = {} if tx_depth is None else {"tx_depth": tx_depth}
    a = await make_engine(provider, **kwargs)
    b = await make_engine(provider)
    n, slot = 10_000, 48
    src = random_bytes(rng, n * slot)
    dst = random_bytes(rng, n * slot + 64)
    expected = dst.copy()
    smr, dmr = a.register(src), b.register(dst)
    lengths = rng.integers(0, slot + 1, n)
    perm = rng.permutation(n)  # slot i of src goes to slot perm[i] of dst
    imms = rng.integers(100, 107, n)
    futs = []
    for i in range(n):
        ln, j = int(lengths[i]), int(perm[i])
        expected[j * slot:j * slot + ln] = src[i * slot:i * slot + ln]
        futs.append(a.write(smr, dmr.descriptor, length=ln, src_offset=i * slot,
                            dst_offset=j * slot, imm=int(imms[i])))
    waiter = asyncio.gather(*[b.expect_imm(v, int((imms == v).sum()), timeout=100)
                              for v in range(100, 107)])
    results = await asyncio.gather(*futs)
    assert results == [None] * n
    await waiter
    assert_bytes(dst, expected, f"seed={seed}")
    await settle(0.1)
    for v in range(100, 107):
        cnt = b.imm_counter(v)
        assert (cnt.value, cnt.total) == (0, int((imms == v).sum())), f"seed={seed} imm {v}"
    assert b.stats()[0]["imms_received"] == n
    assert smr.inflight == 0


async def test_counter_table_is_bounded_against_peers(make_engine, basic_provider, monkeypatch):
    """A peer cannot grow the receiver's counter table without bound: beyond
    the limit, arrivals of NEW values are dropped and counted; values already
    in the table (and ones the receiver armed itself) keep counting."""
    monkeypatch.setenv("AIOTRANSFER_MAX_IMM_VALUES", "4")
    rx = await make_engine(basic_provider)
    monkeypatch.delenv("AIOTRANSFER_MAX_IMM_VALUES")
    tx = await make_engine(basic_provider)
    dmr = rx.register(bytearray(64))
    for v in range(10):                      # 4 new values fit, 6 do not
        await tx.write_imm(dmr.descriptor, 1000 + v)
    await rx.expect_imm(1000, 1, timeout=30)  # a value inside the table
    await tx.write_imm(dmr.descriptor, 1003)  # still counted after the table filled
    await rx.expect_imm(1003, 2, timeout=30)
    deadline = asyncio.get_running_loop().time() + 30
    while rx.stats()[0]["imms_dropped"] < 6:
        assert asyncio.get_running_loop().time() < deadline, rx.stats()
        await asyncio.sleep(0.01)
    assert rx.stats()[0]["imms_dropped"] == 6
    assert rx.imm_counter(1009).total == 0
    # the receiver may still arm its own new values
    waiter = asyncio.ensure_future(rx.expect_imm(5000, 1, timeout=30))
    await asyncio.sleep(0.05)
    await tx.write_imm(dmr.descriptor, 5000)
    await waiter


async def test_idle_counters_are_forgotten_past_the_keep(make_engine, basic_provider, rng, seed):
    """An application naming a new value per request does not fill the
    table: once it holds more than 2048 values, a counter with nothing to
    consume, no waiter and no ImmCounter view is forgotten.  Counters with
    arrivals, waiters or views keep exact counts through the deletions (a
    model checks every value), and consumed values make room again."""
    tx = await make_engine(basic_provider)
    rx = await make_engine(basic_provider)
    d = rx.register(bytearray(64)).descriptor
    base = int(rng.integers(0, 2 ** 31))
    values = [(base + 7919 * k) % 2 ** 32 for k in range(12000)]   # table grows to 32768 slots, then shrinks
    watched = {v: rx.imm_counter(v) for v in values[::233]}    # views: never forgotten
    sent = {v: int(rng.integers(1, 3)) for v in values}
    order = [v for v in values for _ in range(sent[v])]
    rng.shuffle(order)
    for i in range(0, len(order), 1000):                  # 1000 in flight at a time
        await asyncio.gather(*[tx.write_imm(d, v) for v in order[i:i + 1000]])
    await wait_until(lambda: rx.stats()[0]["imms_received"] == len(order), 60,
                     "all immediates received")
    assert rx.imm_values == len(values), f"seed={seed}"
    # consume in random order, sometimes in two steps; half of the watched
    # values keep one arrival
    left = {}
    for j in rng.permutation(len(values)):
        v = values[int(j)]
        keep = 1 if v in watched and v % 2 else 0
        need = sent[v] - keep
        if need == 2 and rng.random() < 0.5:
            await rx.expect_imm(v, 1, timeout=0)
            await rx.expect_imm(v, 1, timeout=0)
        elif need:
            await rx.expect_imm(v, need, timeout=0)
        left[v] = keep
    assert rx.imm_values == 2048, f"seed={seed}"
    for v, c in watched.items():          # the views' books are exact
        assert (c.value, c.total) == (left[v], sent[v]), f"seed={seed} imm {v}"
    # the table still counts: new arrivals, waiters armed before and after
    fresh = [(base + 1 + 7919 * k) % 2 ** 32 for k in range(300)]
    early = [asyncio.ensure_future(rx.expect_imm(v, 2, timeout=60)) for v in fresh[::2]]
    await asyncio.gather(*[tx.write_imm(d, v) for v in fresh for _ in range(2)])
    await asyncio.gather(*early)
    for v in fresh[1::2]:
        await rx.expect_imm(v, 2, timeout=60)
    for v in fresh:
        with pytest.raises(TimeoutError):
            await rx.expect_imm(v, 1, timeout=0)
    del watched, c
    assert rx.imm_values <= 2048 + 1, f"seed={seed}"


async def test_consumed_values_make_room_under_the_bound(make_engine, basic_provider,
                                                          monkeypatch):
    """With the bound at 4 values, a full table of consumed values keeps only
    half the bound, so new values from a peer are counted again."""
    monkeypatch.setenv("AIOTRANSFER_MAX_IMM_VALUES", "4")
    rx = await make_engine(basic_provider)
    monkeypatch.delenv("AIOTRANSFER_MAX_IMM_VALUES")
    tx = await make_engine(basic_provider)
    d = rx.register(bytearray(64)).descriptor
    for v in range(4):
        await tx.write_imm(d, 10 + v)
    for v in range(4):
        await rx.expect_imm(10 + v, 1, timeout=30)
    assert rx.imm_values == 2
    for v in range(2):                       # room for two new values
        await tx.write_imm(d, 20 + v)
        await rx.expect_imm(20 + v, 1, timeout=30)
    assert rx.stats()[0]["imms_dropped"] == 0
    c = rx.imm_counter(30)                   # a view holds its value...
    del c                                    # ...and gives it back
    assert rx.imm_values == 2


async def test_imm_counter_outlives_its_engine(make_engine, basic_provider):
    """A view dropped after its engine closed does nothing (no crash)."""
    e = await make_engine(basic_provider)
    c = e.imm_counter(5)
    await e.close()
    with pytest.raises(aiotransfer.EngineClosedError):
        c.value
    del c
