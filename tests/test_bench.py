"""Smoke of the benchmark harness (aiotransfer.bench): one short bandwidth
point per backend that can run here (aiotransfer on tcp and shm; the raw C
reference if it builds; Mooncake and NIXL only if installed), the sweep's
command line end to end on a tiny plan, and the report logic on a made-up
result.  Never the full sweep; the peers are never required."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from aiotransfer.bench import Backend, Point
from aiotransfer.bench.common import pattern, summarize, verify_region
from aiotransfer.bench.sweep import check_targets, main, report

SMOKE = ["aiotransfer:tcp", "aiotransfer:shm", "raw:tcp", "raw:shm",
         "mooncake:tcp", "nixl:tcp", "nixl:shm"]


def test_point_slots_and_pattern():
    p = Point("bw", 64 << 20, 16, 100)
    assert p.slots == 4 and p.region == 256 << 20          # regions stay within 256 MiB
    assert [p.slot(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert Point("rate", 8, 64, 10, warmup=2).slots == 12  # never more slots than writes
    words = pattern(1 << 16).view(np.uint64)
    assert len(np.unique(words)) == len(words)             # a misplaced write shows
    q = Point("bw", 4096, 8, 32)
    dst = pattern(q.region).copy()
    assert verify_region(dst, q)
    dst[5 * 4096 + 17] ^= 1
    assert not verify_region(dst, q)


def test_summarize_end_to_end_convention():
    p = Point("bw", 1 << 20, 4, 100)
    client = {"t_first": 10.0, "t_done": 10.5, "cpu": 0.2}
    res = summarize(p, {"t_last": 11.0, "cpu": 0.1, "verified": True}, client)
    assert res["gbps_e2e"] == pytest.approx(100 * (1 << 20) / 1.0 / 1e9)
    assert res["end"] == "target" and res["verified"]
    # no arrival time from the target: the client's last completion ends the span
    res = summarize(p, {"cpu": 0.1, "verified": True}, client)
    assert res["gbps_e2e"] == pytest.approx(100 * (1 << 20) / 0.5 / 1e9)
    assert res["end"] == "initiator completion"
    assert not summarize(p, {"t_last": 11.0, "cpu": 0.1, "verified": False}, client)["verified"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spec", SMOKE)
def test_backend_smoke(spec):
    backend = Backend.parse(spec)
    reason = backend.unavailable()
    if reason:
        if backend.kind == "aiotransfer":
            pytest.fail(f"{spec} unavailable: {reason}")
        pytest.skip(f"{spec} unavailable: {reason}")
    res = backend.run(Point("bw", 64 << 10, 16, 64), timeout=60)
    assert res["verified"], res
    assert res["gbps_e2e"] > 0 and res["cpu_us_per_op_client"] > 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode,slots", [("bw", 5), ("rate", 3), ("bw", None)])
def test_raw_reference_writes_the_harness_slots(mode, slots):
    """The C reference spreads its writes over the same slots as the
    aiotransfer side (write i -> slot (i % window) % slots); its target checks
    every written slot against the pattern and every other one for zeros."""
    from aiotransfer.bench.raw import run_raw

    reason = Backend.parse("raw:tcp").unavailable()
    if reason:
        pytest.skip(f"raw C reference unavailable: {reason}")
    r = run_raw("shm", mode, 4096, 8, 37, pages=slots, warmup=3, timeout=60)
    assert r["verified"], r


@pytest.mark.timeout(90)
def test_cli_tiny_sweep(tmp_path, capsys):
    backends = ["aiotransfer:shm"] + (["raw:shm"] if not Backend.parse("raw:shm").unavailable()
                                      else [])
    out = tmp_path / "bench.json"
    png = tmp_path / "bw.png"
    rc = main(["--backends", ",".join(backends), "--sizes", "64K", "--only", "bw,idle",
               "--repeat", "1", "--scale", "0.02", "--idle-seconds", "0.5",
               "--json", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    row = next(r for r in doc["rows"] if r["backend"] == "aiotransfer:shm")
    assert row["verified"] and row["value"] > 0 and row["size"] == 64 << 10
    assert doc["idle_cpu_percent"]["aiotransfer:shm"] >= 0
    assert "Bandwidth, one host, shared memory" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0


def _row(spec, size, value):
    return {"mode": "bw", "backend": spec, "size": size, "window": 16, "value": value,
            "verified": True, "errors": [], "runs": [value], "label": spec}


def test_targets_and_report():
    mib = 1 << 20
    rows = [_row("aiotransfer:tcp", mib, 3.0), _row("mooncake:tcp", mib, 1.2),
            _row("nixl:tcp", mib, 1.0), _row("aiotransfer:shm", mib, 4.0),
            _row("nixl:shm", mib, 5.0), _row("aiotransfer:tcp", 4096, 0.1),
            _row("mooncake:tcp", 4096, 1.0)]
    doc = {"rows": rows, "unavailable": {}, "labels": {},
           "idle_cpu_percent": {"aiotransfer:tcp": 0.1, "aiotransfer:shm": 1.0}}
    t = {x["target"].split(" bandwidth")[0]: x for x in check_targets(doc)}
    mc = t["aiotransfer tcp >= 3x Mooncake tcp"]
    assert mc["met"] is False and "2.50x of 3x (17% short)" in mc["shortfall"]
    assert "4 KiB" not in mc["measured"]             # 1 MiB and above only
    assert t["aiotransfer tcp >= 2x NIXL UCX tcp"]["met"] is True
    assert t["aiotransfer shm >= NIXL UCX shm"]["met"] is False
    assert t["idle open engine <= 2% of a core"]["met"] is True
    doc["targets"] = check_targets(doc)
    text = report(doc)
    assert "| 1 MiB | 16 |" in text and "2.50" in text
