"""Smoke of the benchmark harness (aiotransfer.bench): one short bandwidth
point per backend that can run here (aiotransfer on tcp and shm; the raw C
reference if it builds; Mooncake and NIXL only if installed), the sweep's
command line end to end on a tiny plan, and the report logic on a made-up
result.  Never the full sweep; the peers are never required."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from aiotransfer.bench import Backend, Point
from aiotransfer.bench.common import (median_interval, paired_ratios, pattern, summarize,
                                      verify_region)
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


def test_paired_ratios_pair_runs_by_repeat():
    # a run that failed (None) or a reference of 0 drops only its own pair
    assert paired_ratios([2.0, 4.0, None, 0.0, 5.0], [1.0, 4.4, 3.0, 1.0, None]) == [0.5, 1.1]
    assert paired_ratios([], []) == []


def test_median_interval_coverage_and_order_statistics():
    with pytest.raises(ValueError, match="no samples"):
        median_interval([])
    with pytest.raises(ValueError, match="level"):
        median_interval([1.0], level=1.0)
    assert median_interval([3.0]) == (3.0, 3.0, 0.0)
    # 5 samples: only (min, max) reaches 90% (1 - 2/32)
    assert median_interval([5, 1, 4, 2, 3]) == (1, 5, 1 - 2 / 32)
    rng = random.Random(5)
    for n in range(1, 40):
        xs = [rng.random() for _ in range(n)]
        lo, hi, cov = median_interval(xs)
        ys = sorted(xs)
        k = ys.index(lo) + 1
        assert ys[n - k] == hi and lo <= hi
        tail = lambda j: sum(math.comb(n, i) for i in range(j)) / 2 ** n  # noqa: E731
        assert cov == pytest.approx(1 - 2 * tail(k))
        if n >= 5:
            assert cov >= 0.9
            # the next narrower interval would fall below the level
            if k + 1 <= (n + 1) // 2:
                assert 1 - 2 * tail(k + 1) < 0.9
        else:
            assert (lo, hi) == (ys[0], ys[-1])


def _bench_core():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_core.py"
    spec = importlib.util.spec_from_file_location("bench_core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_core_plan_filters():
    bc = _bench_core()
    full = bc.plan(["shm", "tcp"], False)
    kinds = {(p.mode, p.pages is not None) for p, _ in full}
    assert kinds == {("bw", False), ("rate", False), ("rate", True), ("lat", False)}
    bw = bc.plan(["shm"], False, ("bw",), ("pipeline",))
    assert bw and all(p.mode == "bw" and specs == ["raw:shm", "aiotransfer:shm:pipeline"]
                      for p, specs in bw)
    assert [p.size for p, _ in bw] == [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    paged = bc.plan(["tcp"], False, ("paged",))
    assert [(p.pages, specs) for p, specs in paged] == [(1024, ["raw:tcp:paged", "aiotransfer:tcp:paged"])]
    # the style filter leaves paged and latency points alone
    assert len(bc.plan(["shm"], False, ("paged", "lat"), ("await",))) == 2


def test_bench_core_targets_on_paired_medians():
    bc = _bench_core()
    kib, mib = 1 << 10, 1 << 20

    def row(prov, mode, style, size, raw_runs, aio_runs):
        aio = sorted(aio_runs)[len(aio_runs) // 2]
        return {"provider": bc.NAMES[prov], "mode": mode, "style": style, "size": size,
                "window": 64,
                "raw": None, "aio": aio, "paired": bc._paired(raw_runs, aio_runs, mode)}

    # shm 16 MiB: median over median gives 0.98, but run by run aiotransfer
    # is 0.9 of the C program it ran next to in four repeats of five
    pairs = [row("shm", "bw", "pipeline", s, [10.0] * 5, [10.0] * 5)
             for s in (64 * kib, 256 * kib, mib, 4 * mib)]
    pairs.append(row("shm", "bw", "pipeline", 16 * mib, [9, 10, 11, 12, 13],
                     [11.7, 9.0, 9.9, 10.8, 11.7]))
    pairs.append(row("shm", "bw", "pipeline", 4 * kib, [10.0] * 3, [1.0] * 3))  # not a target
    pairs += [row("tcp", "bw", "pipeline", s, [2.0] * 3, [2.0] * 3) for s in (64 * kib, mib)]
    pairs.append(row("tcp", "rate", "paged", 8, [1.0, 1.0, 1.0], [0.79, 0.81, 0.85]))
    pairs.append(row("shm", "lat", "write", 8, [1.0, 2.0, 1.5], [11.5, 13.0, 12.5]))
    pairs.append(row("shm", "rate", "pipeline", 8, [1.0] * 3, [0.31, 0.29, 0.35]))
    pairs.append(row("shm", "rate", "await", 8, [1.0] * 3, [0.2] * 3))
    t = {x["target"]: x for x in bc.targets(pairs)}
    shm = t["shm bandwidth >= 0.95x raw C, 64 KiB-16 MiB (pipeline style)"]
    assert shm["met"] is False and shm["short"] == ["16 MiB"]
    assert shm["measured"].startswith("64 KiB 1.000,") and "16 MiB 0.900" in shm["measured"]
    assert t["tcp bandwidth >= 0.95x raw C, 64 KiB-16 MiB (pipeline style)"]["met"] is True
    paged = t["tcp paged 8 B >= 0.8x raw C's rate"]
    assert paged["met"] is True and paged["measured"] == "0.810"   # median over median: 0.81
    lat = t["shm 8 B ping-pong within 10 us of raw C"]
    assert lat["met"] is False and lat["measured"] == "+11.0 us"
    rate = t["shm >= 300,000 writes/s, one awaitable per write"]
    assert rate["met"] is True and "pipeline 310,000/s" in rate["measured"]
    assert not any("write style" in k for k in t)      # no row, no verdict


def test_bench_core_sequential_rounds_decide_on_the_interval():
    """More rounds while the paired 90% interval of a target-range bandwidth
    point holds 0.95, for any aiotransfer style; none outside the range."""
    bc = _bench_core()

    def runs(raw, *aio):
        out = {"raw:tcp": [{"gbps_e2e": v, "verified": True} for v in raw]}
        for k, vals in enumerate(aio):
            out[["aiotransfer:tcp:pipeline", "aiotransfer:tcp"][k]] = \
                [{"gbps_e2e": v, "verified": True} for v in vals]
        return out

    p = Point("bw", 1 << 20, 64, 100)
    raw = [2.0] * 5
    assert not bc.bw_undecided(p, runs(raw, [2.2, 2.0, 2.1, 1.95, 2.3]))   # all >= 0.95
    assert not bc.bw_undecided(p, runs(raw, [1.0, 1.2, 1.1, 1.5, 1.8]))    # all < 0.95
    assert bc.bw_undecided(p, runs(raw, [1.0, 2.2, 2.1, 1.95, 2.3]))       # 0.5 .. 1.15
    assert bc.bw_undecided(p, runs(raw, [2.2] * 5, [1.0, 2.2, 2.1, 1.95, 2.3]))  # either style
    failed = runs(raw, [2.2] * 5)
    failed["aiotransfer:tcp:pipeline"][0]["verified"] = False   # a failed run does not count
    assert not bc.bw_undecided(p, failed)
    assert bc.bw_undecided(p, runs(raw[:1], [2.2]))             # one pair decides nothing
    for q in (Point("bw", 4 << 10, 64, 100), Point("bw", 64 << 20, 8, 10),
              Point("rate", 8, 64, 100)):
        assert not bc.bw_undecided(q, runs(raw, [1.0, 2.2, 2.1, 1.95, 2.3]))


@pytest.mark.timeout(90)
def test_run_sweep_adds_rounds_while_undecided():
    """run_sweep's sequential rounds, with the real C reference: `repeat`
    rounds, then more while undecided() says so, never past max_repeat."""
    from aiotransfer.bench.sweep import run_sweep
    if Backend.parse("raw:shm").unavailable():
        pytest.skip(f"raw C reference unavailable: {Backend.parse('raw:shm').unavailable()}")
    point = Point("bw", 64 << 10, 8, 200)
    seen = []

    def undecided(pt, runs):
        seen.append(len(runs["raw:shm"]))
        return len(runs["raw:shm"]) < 3

    doc = run_sweep([(point, ["raw:shm"])], ["raw:shm"], 1, idle=[], idle_seconds=0,
                    timeout=60, progress=False, undecided=undecided, max_repeat=5)
    (row,) = doc["rows"]
    assert len(row["runs"]) == 3 and row["verified"] and seen == [1, 2, 3]
    doc = run_sweep([(point, ["raw:shm"])], ["raw:shm"], 1, idle=[], idle_seconds=0,
                    timeout=60, progress=False, undecided=lambda pt, runs: True, max_repeat=2)
    assert len(doc["rows"][0]["runs"]) == 2
    doc = run_sweep([(point, ["raw:shm"])], ["raw:shm"], 2, idle=[], idle_seconds=0,
                    timeout=60, progress=False, undecided=lambda pt, runs: True, max_repeat=0)
    assert len(doc["rows"][0]["runs"]) == 2       # max_repeat below repeat: repeat rounds


@pytest.mark.timeout(90)
def test_bench_core_cli_tiny(tmp_path, capsys):
    if Backend.parse("raw:shm").unavailable():
        pytest.skip(f"raw C reference unavailable: {Backend.parse('raw:shm').unavailable()}")
    bc = _bench_core()
    out = tmp_path / "core.json"
    assert bc.main(["-p", "shm", "--quick", "--only", "bw", "--style", "pipeline",
                    "--repeat", "2", "--max-repeat", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (r,) = doc["rows"]
    assert r["verified"] and r["style"] == "pipeline" and r["paired"]["n"] == 2
    assert doc["targets"][0]["measured"].startswith("64 KiB ")
    assert "paired (interval)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bc.main(["--only", "bw,speed"])
    assert "--only: speed not among" in capsys.readouterr().err


def _pool_core():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pool_core.py"
    spec = importlib.util.spec_from_file_location("pool_core", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pool_core"] = mod   # (its dataclass looks its module up there)
    spec.loader.exec_module(mod)
    return mod


def _core_doc(raw: list, aio: list, lat_aio: list) -> dict:
    """A made-up bench_core.py result: tcp pipeline bandwidth at every size
    of the targets' range, and a tcp latency point."""
    rows = [{"provider": "tcp;ofi_rxm", "mode": "bw", "style": "pipeline", "size": s,
             "raw_runs": raw, "aio_runs": aio} for s in (64 << 10, 256 << 10, 1 << 20,
                                                         4 << 20, 16 << 20)]
    rows.append({"provider": "tcp;ofi_rxm", "mode": "lat", "style": "write", "size": 8,
                 "raw_runs": [10.0] * len(lat_aio), "aio_runs": lat_aio})
    return {"rows": rows}


def test_pool_core_pools_pairs_across_runs(tmp_path, capsys):
    pc = _pool_core()
    # run 1 misses on its own (its median 0.92); pooled with three runs at
    # 1.00, 1.05 and 1.10 the 19 pairs' median is 1.00, and the 95% interval
    # (5th to 15th of 19) is wholly above 0.95
    docs = [_core_doc([2.0] * 5, [1.8, 1.82, 1.84, 2.0, 2.0], [12.0] * 5),
            _core_doc([2.0] * 5, [2.0] * 5, [13.0] * 5),
            _core_doc([2.0] * 5, [2.1] * 5, [11.0] * 5),
            _core_doc([2.0] * 5, [2.2, 2.2, 2.2, 2.2, None], [11.0] * 5)]
    pts = pc.pool(docs)
    p = pts[("tcp;ofi_rxm", "bw", "pipeline", 64 << 10)]
    assert [round(v, 2) for v in p.per_run] == [0.92, 1.0, 1.05, 1.1] and len(p.values) == 19
    rows = pc.target_rows(pts, 0.95)
    bw = [r for r in rows if "bandwidth" in r["target"]]
    assert len(bw) == 5 and all(r["verdict"] == "met" and r["median"] == 1.0
                                and r["lo"] == 1.0 for r in bw)
    # run 1 alone: open at best (its interval holds 0.95)
    assert pc.target_rows(pc.pool(docs[:1]), 0.95)[0]["verdict"] != "met"
    (lat,) = [r for r in rows if "ping-pong" in r["target"]]
    assert lat["median"] == 1.5 and lat["verdict"] == "met" and lat["unit"] == "us"
    # the command line: a table per target, exit 0 when every non-write target is met
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(d))
    out = tmp_path / "pooled.json"
    assert pc.main([str(f) for f in files] + ["--json", str(out)]) == 0
    assert "| run0 | run1 | run2 | run3 | pooled n |" in capsys.readouterr().out
    assert json.loads(out.read_text())["level"] == 0.95
    # a point absent from one run is None there, not shifted
    docs[1]["rows"] = docs[1]["rows"][1:]
    p = pc.pool(docs)[("tcp;ofi_rxm", "bw", "pipeline", 64 << 10)]
    assert p.per_run[1] is None and len(p.per_run) == 4


def test_pool_core_verdicts_and_bad_input(tmp_path, capsys):
    pc = _pool_core()
    assert pc.verdict(0.96, 1.1, 0.95, True) == "met"
    assert pc.verdict(0.90, 0.94, 0.95, True) == "missed"
    assert pc.verdict(0.90, 1.00, 0.95, True) == "open"
    assert pc.verdict(1.0, 9.0, 10.0, False) == "met"
    assert pc.verdict(11.0, 12.0, 10.0, False) == "missed"
    # every run at 0.9: missed, and the exit status says so
    f = tmp_path / "slow.json"
    f.write_text(json.dumps(_core_doc([2.0] * 9, [1.8] * 9, [12.0] * 9)))
    assert pc.main([str(f)]) == 1
    assert "| missed |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    for text, msg in (("{", "not a readable JSON file"), ('{"rows": 3}', "no 'rows' list"),
                      ('{"rows": [{"provider": "shm"}]}', "a row lacks aio_runs, mode")):
        bad.write_text(text)
        with pytest.raises(SystemExit):
            pc.main([str(bad)])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pc.main([str(f), "--level", "1.5"])
    assert "--level must be in (0, 1)" in capsys.readouterr().err
