"""A small dependency-free progress bar for long work (demo, benchmarks)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line on a terminal; prints a line per 25% elsewhere."""

    def __init__(self, total: int, label: str, unit: str = "", stream: TextIO | None = None,
                 width: int = 30) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.width = width
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._quarter = -1
        self._closed = False

    def update(self, k: int) -> None:
        self.update_to(self.n + k)

    def update_to(self, n: int) -> None:
        self.n = min(int(n), self.total)
        now = time.perf_counter()
        if self.n < self.total and now - self._last < 0.1:
            return
        self._last = now
        self._draw(now)

    def _fmt(self, x: float) -> str:
        if self.unit == "B":
            for u in ("B", "KiB", "MiB", "GiB"):
                if x < 1024 or u == "GiB":
                    return f"{x:.0f} {u}" if u == "B" else f"{x:.1f} {u}"
                x /= 1024
        return f"{x:.0f}{self.unit}"

    def _draw(self, now: float) -> None:
        frac = self.n / self.total
        dt = now - self.t0
        # a rate over less than 50 ms says nothing (a first update can come
        # microseconds after the start with much already done)
        final = self.n >= self.total
        rate = self._fmt(self.n / max(dt, 1e-9)) + "/s" if dt >= 0.05 or final else "-"
        if self._tty:
            full = int(frac * self.width)
            bar = "#" * full + "-" * (self.width - full)
            self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                              f"{self._fmt(self.n)} {rate}   ")
            self.stream.flush()
        else:
            q = int(frac * 4)
            if q > self._quarter:
                self._quarter = q
                self.stream.write(f"{self.label}: {frac * 100:3.0f}% {self._fmt(self.n)} "
                                  f"{rate}\n")
                self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.n = self.total
        self._draw(time.perf_counter())
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
