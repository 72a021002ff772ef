"""The C core's immediate-counter table against a model (tests/ctab_model.c).

The table is an open-addressing hash with backward-shift deletion of idle
counters (docs/semantics.md, "Idle values are forgotten"); the end-to-end
tests in test_imm.py reach only a few thousand steps of it.  Here the C
program includes csrc/atx.c and drives the table itself through millions
of random arrivals, consumptions, pins and unpins, growing and draining it,
and compares every value with a plain array model.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "ctab_model.c"


@pytest.fixture(scope="module")
def ctab_model(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build tests/ctab_model.c")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libfabric"],
                           capture_output=True, text=True, check=True).stdout.split()
    exe = tmp_path_factory.mktemp("ctab") / "ctab_model"
    proc = subprocess.run([cc, "-O2", "-Wall", "-Wno-unused-function", "-o", str(exe),
                           str(SOURCE), str(ROOT / "csrc" / "shm_unstick.c"),
                           str(ROOT / "csrc" / "shm_keys.c"),
                           f"-I{ROOT / 'csrc'}", *flags, "-lpthread"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


# keep 64: deletions start early and most probe runs are short-lived;
# keep 2048: the library's default
@pytest.mark.parametrize("seed,keep", [(1, 64), (2, 2048), (3, 64), (4, 2048), (5, 64),
                                       (6, 64)])
def test_counter_table_matches_the_model(ctab_model, seed, keep):
    proc = subprocess.run([str(ctab_model), str(seed), "5000000", str(keep)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
    # the run grew and shrank the table (else it checked less than it says)
    words = proc.stdout.split()
    assert int(words[words.index("grows") + 1]) > 0, proc.stdout
    assert int(words[words.index("shrinks") + 1]) > 0, proc.stdout
