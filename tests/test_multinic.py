"""Several NICs per engine, across "hosts" (network namespaces of the
testbed, aiotransfer.testbed): every byte and every immediate count checked
by the receiving process, for NIC counts 1/2/3/4 on each side, equal and
unequal."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aiotransfer import testbed

import peers
from support import KiB, MiB
from test_multiprocess import expect, join

pytestmark = pytest.mark.timeout(300)

PROVIDER = "tcp;ofi_rxm"


@pytest.fixture(scope="module")
def fabric():
    """Three hosts with four NICs each, unshaped (a sender and two receivers)."""
    ok, why = testbed.available()
    if not ok:
        pytest.skip(f"multi-host testbed unavailable here: {why}")
    with testbed.Testbed(hosts=3, nics=4) as tb:
        yield tb


def _nics(n: int) -> list[str]:
    return [f"nic{i}" for i in range(n)]


def _plan(rng, n_receivers: int) -> peers.PlanBuilder:
    """Large striped writes, many small ones, paged writes, scatters across
    the receivers, bare immediates, barriers and messages."""
    pb = peers.PlanBuilder(rng, PROVIDER, n_receivers, regions=[24 * MiB, 4 * MiB],
                           src_size=8 * MiB)
    for r in range(n_receivers):
        # striped over the NICs (> 512 KiB), with and without an immediate
        assert pb.write(r, 0, 5 * MiB + int(rng.integers(1, 4096)), imm=100 + r)
        assert pb.write(r, 0, 3 * MiB, imm=None)
        assert pb.write(r, 0, 600 * KiB + 7, imm=110)
        assert pb.write(r, 0, 0, imm=111)            # a zero-byte write with an immediate
        for i in range(40):
            n = int(rng.integers(1, 256 * KiB))
            pb.write(r, 1, n, imm=int(rng.integers(0, 3)) if i % 4 else None)
        pb.paged(r, 0, 300, 4096, imm=120, as_list=False)
        pb.paged(r, 0, 57, 1000, imm=121, as_list=True)
        pb.paged(r, 0, 64, 33 * KiB, imm=None, as_list=False)
        for _ in range(5):
            pb.write_imm(r, 1, 130)
        pb.message(r, b"to %d" % r)
    for k in range(3):
        parts = [(int(rng.integers(0, n_receivers)), int(rng.integers(0, 2)),
                  int(rng.integers(0, 64 * KiB))) for _ in range(20)]
        pb.scatter(parts, imm=140 + k)
    pb.barrier([(r, g) for r in range(n_receivers) for g in range(2)], 150)
    return pb


async def _run(fabric, children, rng, seed, send_nics, recv_nics: list) -> list[dict]:
    """Sender on host 0 with ``send_nics``; receiver i on host i+1 with
    recv_nics[i].  Returns the sender's per-NIC stats."""
    n = len(recv_nics)
    pb = _plan(rng, n)
    rprocs = [children.start(peers.receiver_main, PROVIDER, pb.plans[i],
                             {"netns": fabric.hosts[i + 1].name, "nics": recv_nics[i]})
              for i in range(n)]
    ready = [await expect(conn, "ready") for _, conn in rprocs]
    sproc, sconn = children.start(peers.sender_main, PROVIDER,
                                  {"netns": fabric.hosts[0].name, "nics": send_nics},
                                  pb.ops, pb.src_seed, pb.src_size)
    _, names = await expect(sconn, "ready")
    want = send_nics if isinstance(send_nics, list) else _nics(send_nics)
    assert names == want
    for i in range(n):
        pb.plans[i]["parent_address"] = None
    sconn.send(("targets", [d for _, d in ready], [a for a, _ in ready]))
    await expect(sconn, "posted")
    (stats,) = await expect(sconn, "sent", timeout=180)
    for _, conn in rprocs:
        conn.send(("done", None))
    for i, (_, conn) in enumerate(rprocs):
        (errors,) = await expect(conn, "result")
        assert errors == [], f"seed={seed}: receiver {i} ({recv_nics[i]}) found:\n" + \
            "\n".join(errors)
    for proc, conn in [*rprocs, (sproc, sconn)]:
        conn.send(("bye",))
    for proc, _ in [*rprocs, (sproc, sconn)]:
        assert await join(proc) == 0
    return stats


@pytest.mark.parametrize("send,recv", [(2, 2), (4, 4), (2, 4), (4, 2), (1, 4), (4, 1), (3, 2)],
                         ids=lambda v: str(v))
async def test_multinic_every_byte_and_immediate(fabric, children, rng, seed, send, recv):
    """A sender with `send` NICs, two receivers with `recv` and 2 NICs:
    every byte in place, every immediate count exact, every sender NIC used."""
    stats = await _run(fabric, children, rng, seed, _nics(send), [_nics(recv), _nics(2)])
    assert [s["nic"] for s in stats] == _nics(send)
    for s in stats:
        assert s["wrs_posted"] > 0 and s["bytes_written"] > 0, \
            f"seed={seed}: NIC {s['nic']} carried nothing: {stats}"
        assert s["errors"] == 0 and s["inflight_bytes"] == 0, stats
    # (how evenly bytes spread depends on how fast each NIC drains: unshaped
    # links here are CPU-bound, so shares are checked on shaped links only)


async def test_multinic_count_and_weights(fabric, children, rng, seed):
    """nics=<count> takes the host's NICs by name (loopback excluded)."""
    stats = await _run(fabric, children, rng, seed, 3, [2])
    assert [s["nic"] for s in stats] == _nics(3)


async def test_multinic_unequal_links_still_exact(fabric, children, rng, seed):
    """One of two links shaped to a tenth of the other: everything still
    lands, and the selector gives the slow NIC the smaller share."""
    fabric.shape(0, 0, 2000)
    fabric.shape(0, 1, 200)
    try:
        stats = await _run(fabric, children, rng, seed, _nics(2), [_nics(2)])
    finally:
        fabric.shape(0, 0, None)
        fabric.shape(0, 1, None)
    fast, slow = stats[0]["bytes_written"], stats[1]["bytes_written"]
    assert fast > slow, f"seed={seed}: the 200 Mbit/s NIC carried more than the 2 Gbit/s one: {stats}"
