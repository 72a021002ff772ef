"""The progress bar: a rate only over a meaningful interval; off a terminal,
a line at the start and per 25%."""
from __future__ import annotations

import io

from aiotransfer.progress import ProgressBar


def test_no_rate_in_the_first_50_ms_and_one_at_the_end():
    out = io.StringIO()
    bar = ProgressBar(4 << 20, "recv", unit="B", stream=out)
    bar.update_to(1 << 20)            # microseconds after the start: no rate yet
    bar.t0 -= 1.0                     # as if one second had passed
    bar.update_to(4 << 20)
    lines = out.getvalue().splitlines()
    assert lines[0] == "recv:  25% 1.0 MiB -", lines
    assert lines[-1].startswith("recv: 100% 4.0 MiB ") and lines[-1].endswith(" MiB/s"), lines
    rate = float(lines[-1].split()[-2])
    assert 3.9 <= rate <= 4.1, lines   # 4 MiB over about one second


def test_non_tty_prints_a_line_per_quarter():
    out = io.StringIO()
    bar = ProgressBar(100, "x", stream=out)
    for i in range(1, 101):
        bar.update_to(i)
        bar._last = 0.0               # no redraw throttling in this test
    bar.close()
    # the first update, then each quarter
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["1%", "25%", "50%", "75%", "100%"]
