"""Shared fixtures of the aiotransfer test suite.

* ``provider`` -- parametrized over the libfabric providers the suite covers
  ("tcp", "shm", "udp", "sockets").  Each provider is probed once per session
  in a subprocess (two engines, one write with an immediate, one message).  A
  provider that cannot be opened here is skipped with the probe's reason; one
  that opens but cannot move data fails each test at once with the probe's
  error (a broken build must not look like a skipped provider).
  ``--providers=tcp,shm`` restricts the run.
* ``basic_provider`` -- one working provider for provider-independent checks.
* ``make_engine`` -- async factory of started engines.  Engines of every
  provider except shm are opened on the loopback NIC only (``nics=["lo"]``)
  and their endpoint names are checked to be 127.0.0.0/8 addresses.  Every
  engine is closed at teardown and checked to be closed.
* ``children`` -- spawned child processes ("spawn" context, duplex Pipe);
  joined, or killed, at teardown; a crashed/killed shm child's /dev/shm
  region is removed.
* ``seed`` / ``rng`` -- reproducible randomness; the seed is reported with
  every failure (set ``AIOTRANSFER_TEST_SEED`` to change the base seed).
* ``_loop_guard`` (autouse) -- fails a test whose event loop's exception
  handler was called (e.g. "Future exception was never retrieved", or an
  error in the completion dispatcher) and a test that leaves a running
  ``TransferEngine`` behind.
* ``--run-slow`` enables the tests marked ``slow``.
"""
from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import pytest_asyncio

import aiotransfer

from support import check_loopback_address, nics_for, remove_shm_leftovers

PROVIDERS = ("tcp", "shm", "udp", "sockets")
BASE_SEED = int(os.environ.get("AIOTRANSFER_TEST_SEED", "20240601"))


# ----------------------------------------------------------------- options

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (long soak / scale tests)")
    parser.addoption("--providers", default=",".join(PROVIDERS),
                     help="comma-separated providers to test (default: %(default)s)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: enable with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ------------------------------------------------------------ provider probe

_PROBE = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    import aiotransfer

    async def main(provider, nics):
        a = aiotransfer.TransferEngine(provider=provider, nics=nics)
        try:
            await a.start()
        except aiotransfer.TransferError as exc:
            print("PROBE-UNAVAILABLE", exc)
            return
        b = aiotransfer.TransferEngine(provider=provider, nics=nics)
        try:
            await b.start()
            src = np.arange(65536, dtype=np.uint32).view(np.uint8)
            dst = np.zeros_like(src)
            smr, dmr = a.register(src), b.register(dst)
            await asyncio.wait_for(a.write(smr, dmr.descriptor, imm=7), 20)
            await b.expect_imm(7, 1, timeout=20)
            assert (src == dst).all(), "bytes differ"
            await asyncio.wait_for(a.send(b.address, b"probe"), 20)
            assert await b.recv(timeout=20) == b"probe"
        finally:
            await b.close()
            await a.close()
        print("PROBE-OK")

    nics = None if sys.argv[2] == "-" else sys.argv[2].split(",")
    asyncio.run(main(sys.argv[1], nics))
""")

_probe_cache: dict[str, tuple[str, str]] = {}


def probe_provider(provider: str) -> tuple[str, str]:
    """("ok", ""), ("unavailable", why) if the provider cannot be opened here,
    or ("broken", why) if it opens but the probe's transfer fails."""
    if provider not in _probe_cache:
        nics = nics_for(provider)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _PROBE, provider, ",".join(nics) if nics else "-"],
                capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            result = ("broken", f"provider {provider!r}: probe transfer timed out after 90 s")
        else:
            out = proc.stdout.strip()
            if proc.returncode == 0 and "PROBE-OK" in out:
                result = ("ok", "")
            elif proc.returncode == 0 and out.startswith("PROBE-UNAVAILABLE"):
                result = ("unavailable", f"provider {provider!r} cannot be opened here: "
                                         f"{out[len('PROBE-UNAVAILABLE '):]}")
            else:
                tail = "\n".join(proc.stderr.strip().splitlines()[-5:]) or "(no output)"
                result = ("broken", f"provider {provider!r} opens but the probe transfer "
                                    f"failed (exit {proc.returncode}):\n{tail}")
        _probe_cache[provider] = result
    return _probe_cache[provider]


def provider_works(config: pytest.Config, provider: str) -> bool:
    selected = [p for p in config.getoption("--providers").split(",") if p]
    return provider in selected and probe_provider(provider)[0] == "ok"


def require_provider(config: pytest.Config, provider: str) -> None:
    """Skip if the provider is deselected or cannot be opened here; fail at
    once (instead of timing out test by test) if it opens but cannot move data."""
    selected = [p for p in config.getoption("--providers").split(",") if p]
    if provider not in selected:
        pytest.skip(f"provider {provider!r} not selected (--providers)")
    status, reason = probe_provider(provider)
    if status == "unavailable":
        pytest.skip(reason)
    if status == "broken":
        pytest.fail(reason, pytrace=False)


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    """A working provider short name (others are skipped with the probe's reason)."""
    require_provider(request.config, request.param)
    return request.param


@pytest.fixture
def basic_provider(request: pytest.FixtureRequest) -> str:
    """One working provider (tcp, else shm) for provider-independent checks."""
    for p in ("tcp", "shm"):
        if provider_works(request.config, p):
            return p
    require_provider(request.config, "tcp")  # skips or fails with the reason
    return "tcp"


# ------------------------------------------------------------------ engines

def running_engines() -> list[aiotransfer.TransferEngine]:
    return [o for o in gc.get_objects()
            if type(o) is aiotransfer.TransferEngine
            and getattr(o, "_state", None) == "running"]


@pytest_asyncio.fixture
async def make_engine():
    """``await make_engine(provider, **kwargs)`` -> a started engine.

    ``nics`` defaults to ["lo"] (None for shm).  All engines made here are
    closed at teardown (already-closed ones are left alone) and then checked
    to be closed."""
    engines: list[aiotransfer.TransferEngine] = []

    async def factory(provider: str, **kwargs) -> aiotransfer.TransferEngine:
        kwargs.setdefault("nics", nics_for(provider))
        engine = aiotransfer.TransferEngine(provider=provider, **kwargs)
        engines.append(engine)
        await engine.start()
        if kwargs["nics"] == ["lo"]:
            check_loopback_address(engine.address)
        return engine

    yield factory
    errors = []
    for engine in engines:
        try:
            await engine.close()
        except Exception as exc:  # report every engine, not only the first failure
            errors.append(f"{engine!r}.close() raised {exc!r}")
    errors += [f"{e!r} still open after close()" for e in engines if not e.closed]
    assert not errors, "; ".join(errors)


@pytest_asyncio.fixture
async def pair(make_engine, provider):
    """Two engines of ``provider`` in this process: (sender, receiver)."""
    return await make_engine(provider), await make_engine(provider)


# ------------------------------------------------------------ child processes

class Children:
    """Spawned child processes of one test; all are joined or killed at teardown."""

    def __init__(self) -> None:
        import multiprocessing
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list = []

    def start(self, target, *args):
        """Start ``target(child_conn, *args)`` in a fresh interpreter; returns
        (process, parent end of a duplex Pipe)."""
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        self.procs.append((proc, parent))
        return proc, parent

    def reap(self, timeout: float = 15.0) -> list[str]:
        import time
        problems = []
        deadline = time.monotonic() + timeout
        for proc, conn in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                problems.append(f"child {proc.pid} still running at teardown: killed")
                proc.kill()
                proc.join(10)
            if proc.exitcode != 0:
                remove_shm_leftovers(proc.pid)
            conn.close()
        self.procs.clear()
        return problems


@pytest.fixture
def children():
    kids = Children()
    try:
        yield kids
    finally:
        problems = kids.reap()
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------- randomness

@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    s = BASE_SEED ^ zlib.crc32(request.node.nodeid.encode())
    request.node._aiotransfer_seed = s
    return s


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    s = getattr(item, "_aiotransfer_seed", None)
    if report.failed and s is not None:
        report.sections.append(
            ("random seed", f"seed={s} (base AIOTRANSFER_TEST_SEED={BASE_SEED}, "
                            f"node {item.nodeid})"))


# ------------------------------------------------------------------- guard

@pytest_asyncio.fixture(autouse=True)
async def _loop_guard():
    """Fail the test if the loop's exception handler was called or if it
    left a running TransferEngine behind."""
    loop = asyncio.get_running_loop()
    calls: list[dict] = []
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        calls.append(context)

    before = {id(e) for e in running_engines()}
    loop.set_exception_handler(handler)
    try:
        yield calls
        # futures whose exception nobody retrieved report it when collected:
        # collect now so the report lands in the test that caused it
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    leaked = [e for e in running_engines() if id(e) not in before]
    for e in leaked:
        await e.close()
    problems = []
    if calls:
        problems.append("event loop exception handler was called:\n" + "\n".join(
            f"  {c.get('message')!r}: {c.get('exception')!r}" for c in calls))
    if leaked:
        problems.append(f"test left {len(leaked)} TransferEngine(s) running: {leaked}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ------------------------------------------------------- a bare libfabric peer

@pytest.fixture(scope="module")
def fi_raw(tmp_path_factory):
    """tests/fi_raw.c built: a peer that skips every check of the engine."""
    import rawpeer
    exe, why = rawpeer.build(tmp_path_factory.mktemp("fi_raw"))
    if exe is None:
        pytest.skip(why)
    return exe


@pytest.fixture
def raw_peer(fi_raw, request):
    """``raw_peer(provider)`` -> a running fi_raw peer (closed at teardown)."""
    import rawpeer
    made = []

    def make(provider: str) -> "rawpeer.RawPeer":
        require_provider(request.config, provider)
        p = rawpeer.RawPeer(fi_raw, provider, nics_for(provider)[0])
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()
