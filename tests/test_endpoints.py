"""Several endpoints per NIC (``TransferEngine(endpoints=...)``): the selector
spreads work over them as over NICs; engines with different counts talk."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiotransfer
from aiotransfer import ScatterTarget

from support import KiB, MiB, assert_bytes, random_bytes, settle


@pytest.mark.parametrize("counts", [(2, 1), (1, 3), (4, 2)], ids=lambda c: f"{c[0]}to{c[1]}")
async def test_writes_between_engines_with_different_endpoint_counts(make_engine, provider,
                                                                     counts, rng, seed):
    """Random writes (one of them striped), paged writes and a scatter from an
    engine with ea endpoints to one with eb, then back; every byte checked,
    every immediate counted exactly once, every endpoint of the sender used."""
    ea, eb = counts
    a = await make_engine(provider, endpoints=ea)
    b = await make_engine(provider, endpoints=eb)
    assert [n.endpoints for n in a.nics] == [ea] and [n.endpoints for n in b.nics] == [eb]
    for sender, receiver, eps in ((a, b, ea), (b, a, eb)):
        cap = 4 * MiB
        src = random_bytes(rng, cap)
        dst = np.zeros(cap, np.uint8)
        smr, dmr = sender.register(src), receiver.register(dst)
        expected = dst.copy()
        # one write larger than the stripe (512 KiB): cut over the endpoints
        big = 1536 * KiB + int(rng.integers(0, 4096))
        expected[:big] = src[:big]
        futs = [sender.write(smr, dmr.descriptor, length=big, imm=11)]
        # 120 small writes, disjoint ranges in [2 MiB, 3 MiB)
        sizes = rng.integers(0, 8 * KiB, 120)
        pos = 2 * MiB
        for n in sizes:
            n = int(n)
            so = int(rng.integers(0, cap - n))
            expected[pos:pos + n] = src[so:so + n]
            futs.append(sender.write(smr, dmr.descriptor, length=n, src_offset=so,
                                     dst_offset=pos, imm=12))
            pos += n
        assert pos <= 3 * MiB
        # paged: 300 pages of 8 B at random source pages, into [3 MiB, 3 MiB + 2400)
        sp = rng.choice(cap // 8, 300, replace=False)
        dp = np.arange(300)
        for s_, d_ in zip(sp, dp):
            o = 3 * MiB + int(d_) * 8
            expected[o:o + 8] = src[int(s_) * 8:int(s_) * 8 + 8]
        futs.append(sender.write_paged(smr, sp, dmr.descriptor, dp, page_size=8,
                                       dst_offset=3 * MiB, imm=13))
        # scatter: 16 rows into [3.5 MiB, ...)
        rows = []
        for k in range(16):
            so, do = int(rng.integers(0, cap - 4096)), 3 * MiB + 512 * KiB + k * 4096
            expected[do:do + 4096] = src[so:so + 4096]
            rows.append(ScatterTarget(dmr.descriptor, 4096, so, do))
        futs.append(sender.scatter(smr, rows, imm=14))
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        for imm, count in ((11, 1), (12, 120), (13, 300), (14, 16)):
            await receiver.expect_imm(imm, count, timeout=30)
        assert_bytes(dst, expected, f"seed={seed} {provider} {ea}->{eb} endpoints")
        await settle()
        for imm in (11, 12, 13, 14):
            assert receiver.imm_counter(imm).value == 0, f"seed={seed}: imm {imm} counted twice"
        # connection-based providers connect each endpoint on its first
        # post (tcp: -FI_EAGAIN meanwhile, the selector goes elsewhere); a
        # short burst first can all go to the endpoint that connected
        # first: more bursts until every endpoint took work, up to 10 s
        deadline = asyncio.get_running_loop().time() + 10
        bursts = 0
        while True:
            rows = sender.stats(per_endpoint=True)
            if all(r["wrs_posted"] > 0 for r in rows) or \
                    asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.gather(*[sender.write(smr, dmr.descriptor, length=64,
                                                dst_offset=cap - 64) for _ in range(32)])
            bursts += 1
        if bursts:
            assert_bytes(dst[cap - 64:], src[:64], f"seed={seed}: extra bursts")
        assert [r["endpoint"] for r in rows] == list(range(eps))
        assert all(r["wrs_posted"] > 0 for r in rows), f"seed={seed}: an endpoint unused: {rows}"
        total = sender.stats()[0]
        assert total["endpoints"] == eps
        assert total["wrs_posted"] == sum(r["wrs_posted"] for r in rows)
        assert total["bytes_written"] == sum(r["bytes_written"] for r in rows)
        assert sum(s["imms_duplicate"] for s in receiver.stats()) == 0
        smr.close()
        dmr.close()


async def test_provider_default_endpoints(make_engine, provider, monkeypatch):
    """shm opens two endpoints by default, the others one;
    $AIOTRANSFER_ENDPOINTS overrides both; engine.nics lists each NIC once."""
    monkeypatch.delenv("AIOTRANSFER_ENDPOINTS", raising=False)
    e = await make_engine(provider)
    want = 2 if provider == "shm" else 1
    assert len(e.nics) == 1 and e.nics[0].endpoints == want
    assert len(e.stats()) == 1 and len(e.stats(per_endpoint=True)) == want
    assert len(aiotransfer.EngineAddress.from_bytes(e.address).names) == want
    monkeypatch.setenv("AIOTRANSFER_ENDPOINTS", "3")
    e3 = await make_engine(provider)
    assert e3.nics[0].endpoints == 3 and len(e3.stats(per_endpoint=True)) == 3


@pytest.mark.parametrize("value, exc, text", [
    (0, ValueError, "endpoints=0 must be in [1, 16]"),
    (17, ValueError, "endpoints=17 must be in [1, 16]"),
    (-1, ValueError, "endpoints"),
    ("2", TypeError, "endpoints"),
    (2.0, TypeError, "endpoints"),
])
def test_endpoints_argument_is_checked(value, exc, text):
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        aiotransfer.TransferEngine("tcp", nics=["lo"], endpoints=value)


def test_endpoints_times_nics_is_bounded():
    """NICs x endpoints may not pass 16, said before anything is opened."""
    with pytest.raises(ValueError, match=r"3 NIC\(s\) x endpoints=6 is 18 endpoints; at most 16"):
        aiotransfer.TransferEngine("tcp", nics=["a", "b", "c"], endpoints=6)
    with pytest.raises(ValueError, match="at most 16"):
        aiotransfer.TransferEngine("tcp", nics=2, endpoints=9)
    aiotransfer.TransferEngine("tcp", nics=["a", "b"], endpoints=8)   # 16: allowed


def test_endpoint_bound_applies_to_nics_from_the_environment(monkeypatch):
    monkeypatch.setenv("AIOTRANSFER_NICS", "a,b")
    with pytest.raises(ValueError, match=r"2 NIC\(s\) x endpoints=9 is 18 endpoints"):
        aiotransfer.TransferEngine("tcp", endpoints=9)


@pytest.mark.parametrize("value", ["two", "0", "17"])
def test_endpoints_environment_is_checked(monkeypatch, value):
    monkeypatch.setenv("AIOTRANSFER_ENDPOINTS", value)
    with pytest.raises(ValueError, match="ENDPOINTS|endpoints"):
        aiotransfer.TransferEngine("tcp", nics=["lo"])
