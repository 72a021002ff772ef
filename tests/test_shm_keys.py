"""The shm copy lane's key table (csrc/shm_keys.c), driven from C
(tests/keys_model.c): bounds, withdrawal, a second process's view, the
takeover of a lock whose holder died, tombstones, a full table, shutdown.
The table's part in real transfers is test_copy_lane.py's
test_deregister_ends_copy_lane_writes."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keys_model(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build tests/keys_model.c")
    exe = tmp_path_factory.mktemp("keys") / "keys_model"
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(ROOT / "tests" / "keys_model.c"),
                           str(ROOT / "csrc" / "shm_keys.c"), f"-I{ROOT / 'csrc'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def test_key_table(keys_model):
    engine_id = f"{secrets.randbits(64):016x}"
    try:
        proc = subprocess.run([str(keys_model), engine_id], capture_output=True, text=True,
                              timeout=60)
    finally:
        leftover = glob.glob(f"/dev/shm/atx-keys-{engine_id}")
        for path in leftover:
            os.unlink(path)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert proc.returncode == 0 and not failed, proc.stdout + proc.stderr
    assert len(lines) == 23, proc.stdout
    assert not leftover, "the owner's close did not remove its table"
