"""The synchronous C core (aiotransfer._core.CoreEngine) without asyncio:
post, drain records, count immediates -- real bytes over real providers."""
from __future__ import annotations

import time

import numpy as np
import pytest

from aiotransfer import _core, resolve_provider

from support import nics_for


def _core_engine(provider: str) -> _core.CoreEngine:
    nics = nics_for(provider)
    return _core.CoreEngine(resolve_provider(provider), nics[0] if nics else None)


def _wait_records(eng: _core.CoreEngine, want: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} records: {got}"
        got += eng.drain()
        time.sleep(0.0005)
    return got


def test_core_write_records_and_counters(basic_provider):
    a, b = _core_engine(basic_provider), _core_engine(basic_provider)
    try:
        src = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
        dst = np.zeros(1 << 20, np.uint8)
        smr, dmr = a.register(src), b.register(dst)
        peer = a.peer_insert([b.getname(0)])
        dest = a.dest_add(peer, [dmr.base(0)], [dmr.key(0)])
        # a waiter armed before anything arrived (id 900), fired by 3 arrivals
        assert b.imm_expect(7, 3, 900) is False
        for i in range(3):
            a.post_write(i + 1, smr, i * 4096, dest, i * 8192, 4096, True, 7)
        recs = _wait_records(a, 3)
        assert sorted((r[0], r[1], r[2]) for r in recs) == [(_core.REC_OP, i, 0) for i in (1, 2, 3)]
        assert all(r[4] == 4096 for r in recs)
        fired = _wait_records(b, 1)
        assert [(r[0], r[1], r[4]) for r in fired] == [(_core.REC_WAITER, 900, 3)]
        for i in range(3):
            assert (dst[i * 8192:i * 8192 + 4096] == src[i * 4096:(i + 1) * 4096]).all()
        # arrivals before the waiter: counted, then consumed at once
        a.post_write(4, smr, 0, dest, 0, 16, True, 8)
        _wait_records(a, 1)
        deadline = time.monotonic() + 30
        while b.imm_value(8) != (1, 1):
            assert time.monotonic() < deadline, b.imm_value(8)
            b.drain()
            time.sleep(0.001)
        assert b.imm_expect(8, 1, 901) is True
        assert b.imm_value(8) == (0, 1)
        # a cancelled waiter consumes nothing
        assert b.imm_expect(9, 5, 902) is False
        assert b.imm_cancel(9, 902) is True
        assert b.imm_cancel(9, 902) is False
        a.deregister(smr)
        b.deregister(dmr)
    finally:
        a.destroy()
        b.destroy()


def test_core_stop_fails_queued_work(basic_provider):
    """After stop, posting raises; records of work in flight are delivered."""
    a, b = _core_engine(basic_provider), _core_engine(basic_provider)
    try:
        smr = a.register(np.ones(1 << 16, np.uint8))
        dmr = b.register(np.zeros(1 << 16, np.uint8))
        peer = a.peer_insert([b.getname(0)])
        dest = a.dest_add(peer, [dmr.base(0)], [dmr.key(0)])
        a.post_write(1, smr, 0, dest, 0, 1 << 16, False, 0)
        a.stop()
        recs = a.drain()
        assert [r[1] for r in recs] == [1]
        assert recs[0][2] in (0, _core.FI_ECANCELED)
        with pytest.raises(_core.CoreError):
            a.post_write(2, smr, 0, dest, 0, 8, False, 0)
        a.deregister(smr)
        b.deregister(dmr)
    finally:
        a.destroy()
        b.destroy()
