"""A bare libfabric peer (tests/fi_raw.c) for the security and bad-peer
tests: it sends unframed control messages and RMA writes/reads with any key
and address, as an attacker on the fabric could.  It only ever talks to the
endpoint names the tests give it (the loopback engines of the test)."""
from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from pathlib import Path

import aiotransfer
from aiotransfer import EngineAddress, RemoteRegion

SOURCE = Path(__file__).with_name("fi_raw.c")


def build(outdir: Path) -> tuple[Path | None, str]:
    """Compile fi_raw; (path, "") or (None, why not)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler"
    exe = outdir / "fi_raw"
    proc = subprocess.run([cc, "-O1", "-Wall", "-o", str(exe), str(SOURCE), "-lfabric"],
                          capture_output=True, text=True)
    if proc.returncode:
        return None, f"cannot build fi_raw: {proc.stderr.strip()[-300:]}"
    return exe, ""


class RawPeer:
    """One fi_raw process (``provider``, ``domain``); commands are answered
    one line each (see fi_raw.c)."""

    def __init__(self, exe: Path, provider: str, domain: str | None) -> None:
        self.provider = aiotransfer.resolve_provider(provider)
        self.proc = subprocess.Popen([str(exe), self.provider, domain or "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=os.environ.get("TMPDIR", "/tmp"))
        first = self.proc.stdout.readline().strip()
        if first != "READY":
            self.close()
            raise RuntimeError(f"fi_raw {self.provider}: {first or 'no output'}")

    def _cmd(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"fi_raw died (exit {self.proc.poll()}) on {line[:60]!r}")
        return out.strip()

    async def cmd(self, line: str) -> str:
        """Run one command off the event loop (the engines must keep progressing)."""
        return await asyncio.to_thread(self._cmd, line)

    async def name(self) -> bytes:
        r = await self.cmd("name")
        assert r.startswith("OK "), r
        return bytes.fromhex(r[3:])

    async def peer(self, address: bytes, nic: int = 0) -> int:
        """Insert the engine at ``address`` (its NIC ``nic``); returns the index."""
        name = EngineAddress.from_bytes(address).names[nic]
        r = await self.cmd(f"peer {name.hex()}")
        assert r.startswith("OK "), r
        return int(r[3:])

    async def send(self, peer: int, data: bytes) -> str:
        return await self.cmd(f"send {peer} {data.hex() or '-'}")

    async def write(self, peer: int, key: int, addr: int, data: bytes,
                    cq_data: int | None = None) -> str:
        if cq_data is None:
            return await self.cmd(f"write {peer} {key} {addr} {data.hex() or '-'}")
        return await self.cmd(f"writedata {peer} {key} {addr} {cq_data} {data.hex() or '-'}")

    async def read(self, peer: int, key: int, addr: int, n: int) -> bytes | str:
        """The bytes read, or the error line."""
        r = await self.cmd(f"read {peer} {key} {addr} {n}")
        return bytes.fromhex(r[3:]) if r.startswith("OK ") else r

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


def target(region: RemoteRegion, offset: int = 0) -> tuple[int, int]:
    """(key, remote address) of byte ``offset`` of ``region`` on its NIC 0."""
    return region.keys[0], region.bases[0] + offset


def hello(engine_id: int, names: list[bytes]) -> bytes:
    """An engine's MSG_HELLO as the C core builds it (kind 1, engine id,
    NIC count, then u16 length + name per NIC)."""
    out = [bytes([1]), struct.pack("<Q", engine_id), bytes([len(names)])]
    for n in names:
        out += [struct.pack("<H", len(n)), n]
    return b"".join(out)
