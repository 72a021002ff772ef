"""Bad arguments: the right exception type, a message naming the argument,
and nothing posted (checked with real traffic afterwards)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import aiotransfer
from aiotransfer import ScatterTarget, TransferError

from conftest import require_provider
from support import nics_for, settle

SRC_BYTES = 100
DST_BYTES = 200


@dataclass
class Ctx:
    a: aiotransfer.TransferEngine         # sender
    b: aiotransfer.TransferEngine         # receiver
    smr: aiotransfer.MemoryRegion         # SRC_BYTES of 0xAB at a
    dst: np.ndarray                       # DST_BYTES of zeros at b
    dmr: aiotransfer.MemoryRegion
    d: bytes                              # dmr's descriptor
    foreign: aiotransfer.MemoryRegion     # a region of b (not usable as a's source)
    dead: aiotransfer.MemoryRegion        # a deregistered region of a
    src: np.ndarray
    ops_before: int = 0

    async def assert_nothing_posted(self) -> None:
        """Post one good operation and check that it is the only one that went out."""
        await self.a.write_imm(self.d, 4242)
        await self.b.expect_imm(4242, 1, timeout=30)
        await settle()
        assert self.a.stats()[0]["ops_posted"] == self.ops_before + 1, "a rejected call posted"
        assert self.b.stats()[0]["imms_received"] == 1, "a rejected call delivered an immediate"
        assert not self.dst.any(), "a rejected call wrote bytes"
        assert self.smr.inflight == 0


async def _ctx(make_engine, provider) -> Ctx:
    a = await make_engine(provider)
    b = await make_engine(provider)
    src = np.full(SRC_BYTES, 0xAB, np.uint8)
    dst = np.zeros(DST_BYTES, np.uint8)
    smr, dmr = a.register(src), b.register(dst)
    dead = a.register(bytearray(10))
    a.deregister(dead)
    c = Ctx(a, b, smr, dst, dmr, dmr.descriptor, b.register(bytearray(10)), dead, src)
    # connect once so that later checks count only operations
    await a.write(smr, c.d, length=0)
    await settle(0.01)
    c.ops_before = a.stats()[0]["ops_posted"]
    return c


@pytest.fixture
async def ctx(make_engine, provider) -> Ctx:
    return await _ctx(make_engine, provider)


# ----------------------------------------------------------------- the table
# (id, call, exception type, text the message must contain)

G = b"\x00garbage-descriptor\xff" * 2


def _bad_version(d: bytes) -> bytes:
    b = bytearray(d)
    b[4] = 9
    return bytes(b)


CASES: list[tuple[str, Callable[[Ctx], Any], type, str]] = [
    # write: bounds
    ("write-length-past-src", lambda c: c.a.write(c.smr, c.d, length=SRC_BYTES + 1),
     ValueError, "length"),
    ("write-src_offset-plus-length", lambda c: c.a.write(c.smr, c.d, length=10, src_offset=91),
     ValueError, "src_offset"),
    ("write-src_offset-past-end-default-length", lambda c: c.a.write(c.smr, c.d, src_offset=101),
     ValueError, "src_offset"),
    ("write-src_offset-huge", lambda c: c.a.write(c.smr, c.d, src_offset=2 ** 64 - 1, length=2),
     ValueError, "src_offset"),
    ("write-dst_offset-plus-length", lambda c: c.a.write(c.smr, c.d, length=10, dst_offset=191),
     ValueError, "dst_offset"),
    ("write-dst_offset-past-end", lambda c: c.a.write(c.smr, c.d, length=0, dst_offset=201),
     ValueError, "dst_offset"),
    ("write-dst_offset-huge", lambda c: c.a.write(c.smr, c.d, length=1, dst_offset=2 ** 64 - 1),
     ValueError, "dst_offset"),
    ("write-negative-length", lambda c: c.a.write(c.smr, c.d, length=-1), ValueError, "length"),
    # beyond 64 bits: a ValueError naming the argument, not an OverflowError
    ("write-length-2**64", lambda c: c.a.write(c.smr, c.d, length=2 ** 64), ValueError, "length"),
    ("write-src_offset-2**64", lambda c: c.a.write(c.smr, c.d, src_offset=2 ** 64),
     ValueError, "src_offset"),
    ("write-dst_offset-2**70", lambda c: c.a.write(c.smr, c.d, length=1, dst_offset=2 ** 70),
     ValueError, "dst_offset"),
    ("write-negative-src_offset", lambda c: c.a.write(c.smr, c.d, src_offset=-1),
     ValueError, "src_offset"),
    ("write-negative-dst_offset", lambda c: c.a.write(c.smr, c.d, dst_offset=-1),
     ValueError, "dst_offset"),
    ("write-float-length", lambda c: c.a.write(c.smr, c.d, length=1.0), TypeError, "length"),
    ("write-str-src_offset", lambda c: c.a.write(c.smr, c.d, src_offset="1"),
     TypeError, "src_offset"),
    # write: immediates
    ("write-imm-negative", lambda c: c.a.write(c.smr, c.d, length=1, imm=-1), ValueError, "imm"),
    ("write-imm-2**32", lambda c: c.a.write(c.smr, c.d, length=1, imm=2 ** 32), ValueError, "imm"),
    ("write-imm-2**64", lambda c: c.a.write(c.smr, c.d, length=1, imm=2 ** 64), ValueError, "imm"),
    ("write-imm-numpy-2**32", lambda c: c.a.write(c.smr, c.d, length=1, imm=np.int64(2 ** 32)),
     ValueError, "imm"),
    ("write-imm-float", lambda c: c.a.write(c.smr, c.d, length=1, imm=1.0), TypeError, "imm"),
    ("write-imm-str", lambda c: c.a.write(c.smr, c.d, length=1, imm="1"), TypeError, "imm"),
    # write: regions
    ("write-src-not-a-region", lambda c: c.a.write(bytearray(10), c.d), TypeError, "src_mr"),
    ("write-src-deregistered", lambda c: c.a.write(c.dead, c.d), ValueError, "src_mr"),
    ("write-src-of-other-engine", lambda c: c.a.write(c.foreign, c.d), ValueError, "src_mr"),
    ("write-dst-wrong-type", lambda c: c.a.write(c.smr, 12345), TypeError, "dst"),
    ("write-dst-garbage", lambda c: c.a.write(c.smr, G, length=1), ValueError, "dst"),
    ("write-dst-truncated", lambda c: c.a.write(c.smr, c.d[:-1], length=1), ValueError, "dst"),
    ("write-dst-unknown-version", lambda c: c.a.write(c.smr, _bad_version(c.d), length=1),
     ValueError, "dst"),
    # write_imm
    ("write_imm-imm-2**32", lambda c: c.a.write_imm(c.d, 2 ** 32), ValueError, "imm"),
    ("write_imm-imm-negative", lambda c: c.a.write_imm(c.d, -5), ValueError, "imm"),
    ("write_imm-imm-none", lambda c: c.a.write_imm(c.d, None), TypeError, "imm"),
    ("write_imm-imm-float", lambda c: c.a.write_imm(c.d, 2.5), TypeError, "imm"),
    ("write_imm-dst-garbage", lambda c: c.a.write_imm(G, 1), ValueError, "dst"),
    # write_paged: pages out of bounds
    ("paged-src-page-past-end", lambda c: c.a.write_paged(c.smr, [0, 10], c.d, [0, 1],
                                                          page_size=10), ValueError, "src_pages"),
    ("paged-dst-page-past-end", lambda c: c.a.write_paged(c.smr, [0, 1], c.d, [0, 20],
                                                          page_size=10), ValueError, "dst_pages"),
    ("paged-src-negative-page", lambda c: c.a.write_paged(c.smr, np.array([0, -1]), c.d, [0, 1],
                                                          page_size=10), ValueError, "src_pages"),
    ("paged-dst-negative-page", lambda c: c.a.write_paged(c.smr, [0, 1], c.d, [-3, 1],
                                                          page_size=10), ValueError, "dst_pages"),
    ("paged-src-page-2**63-uint64",
     lambda c: c.a.write_paged(c.smr, np.array([2 ** 63], np.uint64), c.d, [0], page_size=1),
     ValueError, "src_pages"),
    ("paged-src-page-2**64-python-int",
     lambda c: c.a.write_paged(c.smr, [2 ** 64], c.d, [0], page_size=1), ValueError, "src_pages"),
    ("paged-dst-page-2**70-python-int",
     lambda c: c.a.write_paged(c.smr, [0], c.d, [2 ** 70], page_size=1), ValueError, "dst_pages"),
    ("paged-src-offset-pushes-page-out",
     lambda c: c.a.write_paged(c.smr, [9], c.d, [0], page_size=10, src_offset=1),
     ValueError, "src_pages"),
    ("paged-dst-offset-pushes-page-out",
     lambda c: c.a.write_paged(c.smr, [0], c.d, [19], page_size=10, dst_offset=1),
     ValueError, "dst_pages"),
    ("paged-src-stride-pushes-page-out",
     lambda c: c.a.write_paged(c.smr, [0, 9], c.d, [0, 1], page_size=10, src_stride=11),
     ValueError, "src_pages"),
    ("paged-dst-stride-pushes-page-out",
     lambda c: c.a.write_paged(c.smr, [0, 1], c.d, [0, 19], page_size=10, dst_stride=11),
     ValueError, "dst_pages"),
    ("paged-huge-stride-overflow",
     lambda c: c.a.write_paged(c.smr, [2 ** 62], c.d, [0], page_size=1, src_stride=4),
     ValueError, "src_pages"),
    # write_paged: other arguments
    ("paged-length-mismatch", lambda c: c.a.write_paged(c.smr, [0, 1], c.d, [0], page_size=10),
     ValueError, "dst_pages"),
    ("paged-page_size-zero", lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=0),
     ValueError, "page_size"),
    ("paged-page_size-negative", lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=-4),
     ValueError, "page_size"),
    ("paged-page_size-past-src", lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=101),
     ValueError, "src_pages"),
    ("paged-src_stride-zero",
     lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=1, src_stride=0),
     ValueError, "src_stride"),
    ("paged-dst_stride-zero",
     lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=1, dst_stride=0),
     ValueError, "dst_stride"),
    ("paged-2d-pages", lambda c: c.a.write_paged(c.smr, np.zeros((2, 1), int), c.d, [0, 1],
                                                 page_size=1), ValueError, "src_pages"),
    ("paged-float-pages", lambda c: c.a.write_paged(c.smr, [0.0], c.d, [0], page_size=1),
     TypeError, "src_pages"),
    ("paged-str-pages", lambda c: c.a.write_paged(c.smr, [0], c.d, ["0"], page_size=1),
     TypeError, "dst_pages"),
    ("paged-imm-2**32", lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=1,
                                                  imm=2 ** 32), ValueError, "imm"),
    ("paged-imm-float", lambda c: c.a.write_paged(c.smr, [0], c.d, [0], page_size=1, imm=0.0),
     TypeError, "imm"),
    ("paged-dst-garbage", lambda c: c.a.write_paged(c.smr, [0], G, [0], page_size=1),
     ValueError, "dst"),
    # scatter
    ("scatter-length-past-src",
     lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 10), ScatterTarget(c.d, 101)]),
     ValueError, "targets[1]"),
    ("scatter-src_offset-past-src",
     lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 10, src_offset=95)]),
     ValueError, "targets[0]"),
    ("scatter-dst_offset-past-dst",
     lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 1), ScatterTarget(c.d, 1),
                                   ScatterTarget(c.d, 10, dst_offset=195)]),
     ValueError, "targets[2]"),
    ("scatter-negative-length", lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, -1)]),
     ValueError, "targets[0].length"),
    ("scatter-not-a-target", lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 1), (c.d, 1)]),
     TypeError, "targets[1]"),
    ("scatter-dst-garbage",
     lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 1), ScatterTarget(G, 1)]),
     ValueError, "targets[1]"),
    ("scatter-dst-wrong-type", lambda c: c.a.scatter(c.smr, [ScatterTarget(7, 1)]),
     TypeError, "targets[0].dst"),
    ("scatter-imm-2**32", lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 1)], imm=2 ** 32),
     ValueError, "imm"),
    ("scatter-imm-str", lambda c: c.a.scatter(c.smr, [ScatterTarget(c.d, 1)], imm="x"),
     TypeError, "imm"),
    # barrier
    ("barrier-imm-2**32", lambda c: c.a.barrier([c.d], 2 ** 32), ValueError, "imm"),
    ("barrier-imm-negative", lambda c: c.a.barrier([c.d], -1), ValueError, "imm"),
    ("barrier-imm-float", lambda c: c.a.barrier([c.d], 1.5), TypeError, "imm"),
    ("barrier-dst-garbage", lambda c: c.a.barrier([c.d, G], 1), ValueError, "dsts[1]"),
    ("barrier-dst-wrong-type", lambda c: c.a.barrier([c.d, None], 1), TypeError, "dsts[1]"),
    # receiving side (async calls)
    ("expect_imm-imm-2**32", lambda c: c.b.expect_imm(2 ** 32, 1), ValueError, "imm"),
    ("expect_imm-imm-negative", lambda c: c.b.expect_imm(-1, 1), ValueError, "imm"),
    ("expect_imm-imm-float", lambda c: c.b.expect_imm(1.0, 1), TypeError, "imm"),
    ("expect_imm-count-negative", lambda c: c.b.expect_imm(1, -1), ValueError, "count"),
    ("expect_imm-count-float", lambda c: c.b.expect_imm(1, 1.5), TypeError, "count"),
    ("expect_imm-timeout-negative", lambda c: c.b.expect_imm(1, 1, timeout=-1), ValueError,
     "timeout"),
    ("imm_counter-imm-2**32", lambda c: c.b.imm_counter(2 ** 32), ValueError, "imm"),
    ("imm_counter-imm-str", lambda c: c.b.imm_counter("1"), TypeError, "imm"),
    # messages
    ("send-oversize", lambda c: c.a.send(c.b.address, bytes(65537)), ValueError, "data"),
    ("send-data-not-bytes", lambda c: c.a.send(c.b.address, "text"), TypeError, "data"),
    ("send-address-garbage", lambda c: c.a.send(G, b"x"), ValueError, "address"),
    ("send-address-wrong-type", lambda c: c.a.send(42, b"x"), TypeError, "address"),
    # registration
    ("register-readonly", lambda c: c.a.register(b"read-only bytes"), TypeError, "buf"),
    ("register-not-contiguous", lambda c: c.a.register(np.zeros((10, 10), np.uint8)[:, ::2]),
     ValueError, "buf"),
    ("register-empty", lambda c: c.a.register(bytearray()), ValueError, "buf"),
    ("register-not-a-buffer", lambda c: c.a.register(12345), TypeError, "buf"),
    ("deregister-not-a-region", lambda c: c.a.deregister(b"x"), TypeError, "mr"),
    ("deregister-other-engines-region", lambda c: c.a.deregister(c.foreign), ValueError, "mr"),
]


async def _call(fn: Callable[[Ctx], Any], c: Ctx) -> None:
    r = fn(c)
    if asyncio.iscoroutine(r):
        await r
    else:  # it must not have returned a future: that would mean it was posted
        raise AssertionError(f"call returned {r!r} instead of raising")


async def _check_case(c: Ctx, case) -> None:
    name, fn, exc, text = case
    with pytest.raises(exc) as info:
        await _call(fn, c)
    assert text in str(info.value), f"{name}: message {str(info.value)!r} does not name {text!r}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_bad_argument(make_engine, basic_provider, case):
    """Each bad input on its own (argument checks do not depend on the provider)."""
    c = await _ctx(make_engine, basic_provider)
    await _check_case(c, case)
    await c.assert_nothing_posted()


async def test_all_bad_arguments(ctx):
    """The whole table on every provider, then one check that nothing went out."""
    failures = []
    for case in CASES:
        try:
            await _check_case(ctx, case)
        except BaseException as exc:  # collect: report every broken case at once
            failures.append(f"{case[0]}: {exc!r}"[:300])
    await ctx.assert_nothing_posted()
    assert not failures, "\n".join(failures)


async def test_scatter_rejects_all_or_nothing(ctx):
    """A bad target after good ones: nothing of the scatter is posted."""
    good = [ScatterTarget(ctx.d, 10, dst_offset=10 * i) for i in range(5)]
    with pytest.raises(ValueError, match=r"targets\[5\]"):
        ctx.a.scatter(ctx.smr, good + [ScatterTarget(ctx.d, 10, dst_offset=195)], imm=3)
    with pytest.raises(ValueError, match="dsts"):
        ctx.a.barrier([ctx.d] * 3 + [b"zz"], 3)
    await ctx.assert_nothing_posted()
    assert ctx.b.imm_counter(3).total == 0


async def test_destination_of_another_provider(make_engine, request):
    require_provider(request.config, "tcp")
    require_provider(request.config, "shm")
    a = await make_engine("tcp")
    s = await make_engine("shm")
    smr = a.register(bytearray(8))
    d = s.register(bytearray(8)).descriptor
    with pytest.raises(ValueError, match="provider"):
        a.write(smr, d)
    with pytest.raises(ValueError, match="provider"):
        a.send(s.address, b"x")


def test_constructor_arguments():
    E = aiotransfer.TransferEngine
    with pytest.raises(TypeError, match="nics"):
        E("tcp", nics="lo")
    with pytest.raises(TypeError, match="nics"):
        E("tcp", nics=[""])
    with pytest.raises(ValueError, match="nics"):
        E("tcp", nics=["lo", "lo"])
    with pytest.raises(TypeError, match="provider"):
        E("")
    with pytest.raises(ValueError, match="msg_size"):
        E("tcp", msg_size=0)
    with pytest.raises(ValueError, match="msg_size"):
        E("tcp", msg_size=-1)
    with pytest.raises(ValueError, match="msg_count"):
        E("tcp", msg_count=0)
    with pytest.raises(ValueError, match="max_chunk"):
        E("tcp", max_chunk=0)


@pytest.mark.parametrize("name,value", [("AIOTRANSFER_COPY_LANE_MIN", "64k"),
                                        ("AIOTRANSFER_COPY_LANE_MIN", "-1"),
                                        ("AIOTRANSFER_SPIN_US", "1.5"),
                                        ("AIOTRANSFER_COALESCE_US", " 25"),
                                        ("AIOTRANSFER_MAX_IMM_VALUES", "0")])
def test_core_environment_is_checked(monkeypatch, name, value):
    """The C core's tunables are whole numbers: anything else is ValueError
    naming the variable, before an engine opens anything."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"\${name}=.* must be a whole number"):
        aiotransfer.TransferEngine("shm")


async def test_unknown_provider_or_nic_fails_at_start():
    engine = aiotransfer.TransferEngine("no-such-provider")
    with pytest.raises(TransferError, match="no-such-provider"):
        await engine.start()
    engine = aiotransfer.TransferEngine("tcp", nics=["no-such-nic0"])
    with pytest.raises(TransferError, match="no-such-nic0"):
        await engine.start()


async def test_engine_not_started():
    engine = aiotransfer.TransferEngine("tcp", nics=nics_for("tcp"))
    with pytest.raises(RuntimeError, match="start"):
        engine.register(bytearray(8))
    with pytest.raises(RuntimeError, match="start"):
        engine.address  # noqa: B018
    await engine.close()  # closing a never-started engine is fine


async def test_deregister_with_writes_in_flight(pair, rng):
    a, b = pair
    src = np.ones(1 << 20, np.uint8)
    smr = a.register(src)
    dmr = b.register(np.zeros(1 << 20, np.uint8))
    futs = [a.write(smr, dmr.descriptor, imm=1) for _ in range(4)]
    assert smr.inflight == 4
    with pytest.raises(BufferError):
        a.deregister(smr)
    with pytest.raises(BufferError):
        smr.close()
    assert not smr.closed
    await asyncio.gather(*futs)
    assert smr.inflight == 0
    a.deregister(smr)
    assert smr.closed
    a.deregister(smr)  # twice is fine
    with pytest.raises(ValueError, match="src_mr"):
        a.write(smr, dmr.descriptor)
    await b.expect_imm(1, 4, timeout=30)
