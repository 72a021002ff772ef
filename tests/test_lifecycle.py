"""Engine lifecycle: start/close, NIC info, closed-engine errors, close with
operations in flight."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiotransfer
from aiotransfer import EngineClosedError, ScatterTarget, TransferError

import peers
from support import MAX_TRANSFER, MiB, assert_bytes, nics_for, random_bytes


async def test_start_close_and_context_manager(provider):
    engine = aiotransfer.TransferEngine(provider=provider, nics=nics_for(provider))
    assert not engine.closed
    assert await engine.start() is engine
    with pytest.raises(RuntimeError):
        await engine.start()
    await engine.close()
    assert engine.closed
    await engine.close()  # idempotent
    async with aiotransfer.TransferEngine(provider=provider, nics=nics_for(provider)) as e2:
        assert isinstance(e2, aiotransfer.TransferEngine) and not e2.closed
        mr = e2.register(bytearray(10))
    assert e2.closed
    assert mr.closed, "closing the engine deregisters its regions"
    mr.close()  # harmless now


async def test_context_manager_closes_on_error(provider):
    with pytest.raises(KeyError):
        async with aiotransfer.TransferEngine(provider=provider, nics=nics_for(provider)) as e:
            raise KeyError("boom")
    assert e.closed


async def test_address_and_nics(make_engine, provider):
    e = await make_engine(provider)
    assert isinstance(e.address, bytes) and e.address
    assert aiotransfer.EngineAddress.from_bytes(e.address).provider == \
        aiotransfer.resolve_provider(provider)
    nics = e.nics
    assert isinstance(nics, list) and len(nics) == 1
    nic = nics[0]
    assert isinstance(nic, aiotransfer.NicInfo)
    assert nic.provider == aiotransfer.resolve_provider(provider)
    if provider != "shm":
        assert nic.name == "lo"
    assert nic.link_speed is None or (isinstance(nic.link_speed, int) and nic.link_speed > 0)
    other = await make_engine(provider)
    assert other.address != e.address


async def test_closed_engine_rejects_everything(make_engine, provider):
    a = await make_engine(provider)
    b = await make_engine(provider)
    smr = a.register(bytearray(64))
    d = b.register(bytearray(64)).descriptor
    counter = a.imm_counter(1)
    await a.write(smr, d, imm=1)
    await a.close()
    calls = {
        "write": lambda: a.write(smr, d),
        "write_imm": lambda: a.write_imm(d, 1),
        "write_paged": lambda: a.write_paged(smr, [0], d, [0], page_size=8),
        "scatter": lambda: a.scatter(smr, [ScatterTarget(d, 8)]),
        "barrier": lambda: a.barrier([d], 1),
        "send": lambda: a.send(b.address, b"x"),
        "register": lambda: a.register(bytearray(8)),
        "imm_counter": lambda: a.imm_counter(1),
        "address": lambda: a.address,
        "nics": lambda: a.nics,
        "counter.value": lambda: counter.value,
    }
    for name, call in calls.items():
        with pytest.raises(EngineClosedError):
            call()
            pytest.fail(f"{name} on a closed engine did not raise")
    for name, coro in {"expect_imm": lambda: a.expect_imm(1, 1),
                       "recv": lambda: a.recv(),
                       "counter.wait": lambda: counter.wait(1)}.items():
        with pytest.raises(EngineClosedError):
            await asyncio.wait_for(coro(), 5)
    assert issubclass(EngineClosedError, TransferError)
    # the peer is unaffected
    await b.write_imm(b.register(bytearray(1)).descriptor, 3)
    await b.expect_imm(3, 1, timeout=30)


async def test_write_methods_kept_across_close(make_engine, provider):
    """A running engine's write and write_imm, kept by a caller (a bound
    method taken while it ran), raise EngineClosedError naming the
    operation once the engine is closed; the engine's own attributes do
    too."""
    a = await make_engine(provider)
    b = await make_engine(provider)
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(64, np.uint8)
    smr, d = a.register(src), b.register(dst).descriptor
    write, write_imm = a.write, a.write_imm
    await write(smr, d, length=64, imm=1)
    await write_imm(d, 2)
    await b.expect_imm(1, 1, timeout=30)
    await b.expect_imm(2, 1, timeout=30)
    assert_bytes(dst, src, "write through a kept bound method")
    await a.close()
    for name, call in (("write", lambda: write(smr, d, length=8, imm=1)),
                       ("write_imm", lambda: write_imm(d, 2))):
        with pytest.raises(EngineClosedError) as info:
            call()
        assert info.value.op == name, f"{name}: op {info.value.op!r}"
    for call in (lambda: a.write(smr, d), lambda: a.write_imm(d, 1)):
        with pytest.raises(EngineClosedError):
            call()
    with pytest.raises(TypeError):   # still keyword-only after the first two
        await b.write(b.register(bytearray(8)), d, 8)


async def test_subclass_overrides_of_write_are_called(provider, rng, seed):
    """A TransferEngine subclass that overrides write / write_imm gets its
    overrides called on a running engine (the fast path steps aside)."""
    calls: list[str] = []

    class Logged(aiotransfer.TransferEngine):
        def write(self, src_mr, dst, **kw):
            calls.append("write")
            return super().write(src_mr, dst, **kw)

        def write_imm(self, dst, imm):
            calls.append("write_imm")
            return super().write_imm(dst, imm)

    kw = {"nics": nics_for(provider)}
    async with Logged(provider, **kw) as a, aiotransfer.TransferEngine(provider, **kw) as b:
        src = random_bytes(rng, 4096)
        dst = np.zeros(4096, np.uint8)
        smr, d = a.register(src), b.register(dst).descriptor
        await a.write(smr, d, length=4096, imm=5)
        await a.write_imm(d, 6)
        await b.expect_imm(5, 1, timeout=30)
        await b.expect_imm(6, 1, timeout=30)
        assert_bytes(dst, src, f"seed={seed}: write through the subclass")
        assert calls == ["write", "write_imm"], calls


async def test_writes_in_asyncio_debug_mode(provider, rng, seed):
    """With the loop in debug mode the poll tick goes through call_soon
    (asyncio's checks stay on); writes of random sizes land byte for byte."""
    loop = asyncio.get_running_loop()
    was = loop.get_debug()
    loop.set_debug(True)
    try:
        kw = {"nics": nics_for(provider)}
        async with aiotransfer.TransferEngine(provider, **kw) as a, \
                aiotransfer.TransferEngine(provider, **kw) as b:
            cap = 256 * 1024
            src = random_bytes(rng, cap)
            dst = np.zeros(cap, np.uint8)
            smr, d = a.register(src), b.register(dst).descriptor
            exp = dst.copy()
            futs, n, step = [], 32, cap // 32
            for i in range(n):
                ln = int(rng.integers(1, step))
                exp[i * step:i * step + ln] = src[i * step:i * step + ln]
                futs.append(a.write(smr, d, length=ln, src_offset=i * step,
                                    dst_offset=i * step, imm=1))
            await asyncio.wait_for(asyncio.gather(*futs), 30)
            await b.expect_imm(1, n, timeout=30)
            assert_bytes(dst, exp, f"seed={seed}: writes in debug mode")
    finally:
        loop.set_debug(was)


def _outcomes(results) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        k = "ok" if r is None else type(r).__name__
        out[k] = out.get(k, 0) + 1
    return out


@pytest.mark.parametrize("tx_depth", [None, 2], ids=["default-depth", "tx_depth=2"])
async def test_close_sender_with_operations_in_flight(make_engine, children, provider, seed,
                                                      tx_depth):
    """Close the *sender* while writes of every kind are in flight: each
    future ends (None or EngineClosedError), nothing hangs, and the target
    keeps working for a new sender (peers.close_sender_in_flight).

    shm runs the same two-engines-in-one-process scenario inside a spawned
    child, so that a crash inside libfabric fails this test only."""
    await peers.run_scenario("close_sender_in_flight", make_engine, children, provider, seed,
                             tx_depth, isolate=provider == "shm")


async def test_close_target_with_writes_in_flight(make_engine, provider, rng):
    """Close the *target* while another engine writes to it: the writer's
    futures end (None or TransferError) at the latest when the writer is
    closed; nothing hangs.  shm is excluded: with both engines in one
    process libfabric 1.17's shm can crash here (shared mapped regions); it
    is covered across processes in test_multiprocess.py.  (tcp was excluded
    until session 13 for a crash in fi_close: see
    test_close_target_mid_stream.)"""
    if provider == "shm":
        pytest.skip("shm in one process: closing the target with writes in flight can crash "
                    "libfabric 1.17 (known hazard); see test_multiprocess.py")
    a = await make_engine(provider)
    b = await make_engine(provider)
    n = min(MAX_TRANSFER[provider], 1 * MiB)
    smr = a.register(random_bytes(rng, n))
    d = b.register(np.zeros(n, np.uint8)).descriptor
    futs = [a.write(smr, d, imm=1) for _ in range(60)]
    await asyncio.sleep(0.005)
    await asyncio.wait_for(b.close(), 30)
    await asyncio.wait(futs, timeout=1)
    await asyncio.wait_for(a.close(), 30)
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    assert all(r is None or isinstance(r, TransferError) for r in results), _outcomes(results)


async def test_close_target_mid_stream(make_engine, children, provider, seed):
    """Close the *target* at a random moment of a stream of 4 MiB writes with
    immediates, three times (once on udp; peers.close_target_mid_stream): the close
    returns, every write ends, every byte is the source's or untouched.  On
    tcp this crashed libfabric 1.17 almost every round until the engine shut
    its sockets for reading before closing its endpoints.  Run in a spawned
    child, so that a crash fails this test only; shm is excluded as above
    (both engines in one process)."""
    if provider == "shm":
        pytest.skip("shm in one process: closing the target with writes in flight can crash "
                    "libfabric 1.17 (known hazard); see test_multiprocess.py")
    # (udp: each round waits for the writes to the closed target to time out)
    rounds = 1 if provider == "udp" else 3
    outcome = await peers.run_scenario("close_target_mid_stream", make_engine, children,
                                       provider, seed, rounds, isolate=True)
    assert outcome.get("ok", 0) >= rounds, outcome


async def test_closing_cancels_pending_waiters_and_receivers(make_engine, provider):
    e = await make_engine(provider)
    tasks = [asyncio.create_task(e.expect_imm(i, 1)) for i in range(5)]
    tasks += [asyncio.create_task(e.expect_imm(7, 3, timeout=60))]
    tasks += [asyncio.create_task(e.recv()) for _ in range(3)]
    tasks += [asyncio.create_task(e.imm_counter(8).wait(2))]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    await asyncio.wait_for(e.close(), 30)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert all(isinstance(r, EngineClosedError) for r in results), results


async def test_cancelled_write_future(pair, rng, seed):
    """Cancelling the future of a write does not stop the write (it is
    posted); the region stays in flight until the NIC is done with it."""
    a, b = pair
    src = random_bytes(rng, 1 * MiB)
    dst = np.zeros(1 * MiB, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    fut = a.write(smr, dmr.descriptor, imm=6)
    fut.cancel()
    with pytest.raises(BufferError):      # the NIC may still read it
        a.deregister(smr)
    await b.expect_imm(6, 1, timeout=30)
    assert_bytes(dst, src, f"seed={seed}")
    await asyncio.wait_for(_wait_inflight_zero(smr), 30)
    a.deregister(smr)


async def _wait_inflight_zero(mr) -> None:
    while mr.inflight:
        await asyncio.sleep(0.005)


async def test_many_engines_open_and_close(make_engine, provider):
    """Engines come and go; the survivors still talk."""
    keep = await make_engine(provider)
    d = keep.register(bytearray(16)).descriptor
    for i in range(6):
        e = await make_engine(provider)
        await e.write_imm(d, 100 + i)
        await e.close()
    for i in range(6):
        await keep.expect_imm(100 + i, 1, timeout=30)
