"""Helpers shared by the tests and by the spawned peer processes (tests/peers.py)."""
from __future__ import annotations

import asyncio
import glob
import os
import socket
import struct
import time

import numpy as np

from aiotransfer import EngineAddress

KiB = 1 << 10
MiB = 1 << 20

#: Largest single transfer per provider.  udp;ofi_rxd moves ~0.2 GB/s here.
MAX_TRANSFER = {"tcp": 64 * MiB, "shm": 64 * MiB, "sockets": 64 * MiB, "udp": 4 * MiB}


def nics_for(provider: str) -> list[str] | None:
    """Every provider but shm is pinned to the loopback NIC."""
    return None if provider == "shm" else ["lo"]


def check_loopback_address(address: bytes) -> None:
    """Assert that every endpoint name of an engine is a loopback socket address."""
    ea = EngineAddress.from_bytes(address)
    for name in ea.names:
        (family,) = struct.unpack_from("<H", name, 0)
        if family == socket.AF_INET:
            ip = socket.inet_ntop(socket.AF_INET, name[4:8])
            assert ip.startswith("127."), f"engine endpoint {ip} is not on loopback"
        elif family == socket.AF_INET6:
            ip = socket.inet_ntop(socket.AF_INET6, name[8:24])
            assert ip == "::1", f"engine endpoint {ip} is not on loopback"
        else:
            raise AssertionError(f"engine endpoint name {name.hex()} is not a socket address")


def remove_shm_leftovers(pid: int) -> None:
    """A shm engine's process that was killed or crashed cannot unlink its
    shared-memory region (/dev/shm/<pid>:<n>:<m>) nor its copy lane's key
    table (/dev/shm/atx-keys-<engine id>, the owner's pid at byte 16:
    csrc/shm_keys.c); the parent does."""
    paths = glob.glob(f"/dev/shm/{pid}:*")
    for path in glob.glob("/dev/shm/atx-keys-*"):
        try:
            with open(path, "rb") as f:
                head = f.read(20)
        except FileNotFoundError:
            continue
        if len(head) == 20 and int.from_bytes(head[16:20], "little", signed=True) == pid:
            paths.append(path)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def fresh_pair(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A random source and a destination pre-filled with other random bytes."""
    return random_bytes(rng, n), random_bytes(rng, n)


def assert_bytes(actual, expected, what: str) -> None:
    """Compare two byte buffers; on mismatch name the first differing byte."""
    a = np.frombuffer(actual, dtype=np.uint8) if not isinstance(actual, np.ndarray) else actual
    e = np.frombuffer(expected, dtype=np.uint8) if not isinstance(expected, np.ndarray) \
        else expected
    a = a.reshape(-1).view(np.uint8)
    e = e.reshape(-1).view(np.uint8)
    assert a.nbytes == e.nbytes, f"{what}: {a.nbytes} bytes, expected {e.nbytes}"
    if not np.array_equal(a, e):
        bad = np.flatnonzero(a != e)
        raise AssertionError(
            f"{what}: {bad.size} of {a.nbytes} bytes differ; first at byte {int(bad[0])} "
            f"(got {int(a[bad[0]])}, expected {int(e[bad[0]])}), last at byte {int(bad[-1])}")


def random_sizes(rng: np.random.Generator, provider: str, count: int,
                 big: int = 1) -> list[int]:
    """``count`` sizes from 0 B up to the provider's cap: the edges (0, 1),
    small odd sizes, a few up to 1 MiB and ``big`` ones up to the cap."""
    cap = MAX_TRANSFER[provider]
    sizes = [0, 1]
    while len(sizes) < count - big:
        kind = rng.integers(0, 3)
        if kind == 0:
            sizes.append(int(rng.integers(2, 4 * KiB)))
        elif kind == 1:
            sizes.append(int(rng.integers(4 * KiB, 256 * KiB)))
        else:
            sizes.append(int(rng.integers(256 * KiB, MiB)))
    for _ in range(big):
        sizes.append(int(rng.integers(cap // 2, cap + 1)))
    return sizes[:count]


async def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


async def wait_arrivals(counter, total: int, timeout: float = 30.0) -> None:
    """Wait (without consuming) until ``counter`` has seen ``total`` arrivals."""
    await wait_until(lambda: counter.total >= total, timeout,
                     f"{total} arrivals of imm {counter.imm} (have {counter.total})")


async def settle(seconds: float = 0.05) -> None:
    """Give in-flight stray traffic a chance to show up before counting it."""
    await asyncio.sleep(seconds)
