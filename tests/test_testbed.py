"""aiotransfer.testbed: the network-namespace multi-host, multi-NIC fabric.

Every test that builds namespaces skips (with the reason from
``testbed.available()``) where that is impossible: not root, no
``ip``/``tc``/``nft``, or a container without CAP_SYS_ADMIN.  Throughput is
measured with plain Python TCP sockets created inside the host namespaces
(``Testbed.socket``), over short transfers (a few MB at 100-200 Mbit/s).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

from aiotransfer import testbed

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
def need_testbed() -> None:
    ok, why = testbed.available()
    if not ok:
        pytest.skip(f"network-namespace testbed unavailable: {why}")


def netns_names() -> set[str]:
    try:
        return set(os.listdir(testbed.NETNS_DIR))
    except FileNotFoundError:
        return set()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def netns_inode(name: str) -> int:
    return os.stat(os.path.join(testbed.NETNS_DIR, name)).st_ino


def processes_in_netns(inode: int) -> list[int]:
    """Every task (thread included) whose network namespace is ``inode``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                if os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino == inode:
                    found.append(int(tid))
            except OSError:
                pass
    return found


# --------------------------------------------------------------- streaming

def listen(tb: testbed.Testbed, host: int, nic: int) -> socket.socket:
    srv = tb.socket(host)
    srv.bind((tb.hosts[host].nics[nic].addr, 0))
    srv.listen(8)
    return srv


def connect(tb: testbed.Testbed, host: int, src_nic: int | None, dst: tuple[str, int],
            timeout: float = 5.0) -> socket.socket:
    """A client socket of ``host``, bound to NIC ``src_nic``'s address (or
    not bound at all with None), connected to ``dst``."""
    cli = tb.socket(host)
    cli.settimeout(timeout)
    if src_nic is not None:
        cli.bind((tb.hosts[host].nics[src_nic].addr, 0))
    cli.connect(dst)
    return cli


def transfer(tb: testbed.Testbed, src: tuple[int, int | None], dst: tuple[int, int],
             nbytes: int) -> tuple[float, str]:
    """Send ``nbytes`` from (host, nic) to a server on (host, nic).
    Returns (receiver's goodput in Mbit/s from first to last byte, the
    client address the server saw)."""
    srv = listen(tb, *dst)
    result: dict = {}

    def receive() -> None:
        conn, peer = srv.accept()
        buf = bytearray(1 << 20)
        got, first = 0, None
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            if first is None:
                first = time.monotonic()
            got += n
        result.update(got=got, secs=time.monotonic() - first, peer=peer[0])
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    try:
        cli = connect(tb, src[0], src[1], srv.getsockname(), timeout=30)
        chunk = b"\xa5" * (1 << 20)
        left = nbytes
        while left:
            left -= cli.send(memoryview(chunk)[:min(left, len(chunk))])
        cli.close()
    finally:
        t.join(60)
        srv.close()
    assert result.get("got") == nbytes, result
    return result["got"] * 8 / result["secs"] / 1e6, result["peer"]


class Stream:
    """A continuous TCP stream (host 0 NIC k -> host 1 NIC k) whose received
    byte count can be sampled."""

    def __init__(self, tb: testbed.Testbed, nic: int) -> None:
        self.received = 0
        self.stop = threading.Event()
        self.srv = listen(tb, 1, nic)
        self.cli = connect(tb, 0, nic, self.srv.getsockname())
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(0.2)
        self.cli.settimeout(0.2)
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        chunk = memoryview(b"\x5a" * 65536)
        while not self.stop.is_set():
            try:
                self.cli.send(chunk)
            except socket.timeout:
                pass
            except OSError:
                return

    def _recv(self) -> None:
        buf = bytearray(1 << 20)
        while not self.stop.is_set():
            try:
                n = self.conn.recv_into(buf)
            except socket.timeout:
                continue
            except OSError:
                return
            if not n:
                return
            self.received += n

    def grows_within(self, seconds: float, minimum: int = 1) -> bool:
        start = self.received
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.received - start >= minimum:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for s in (self.cli, self.conn, self.srv):
            s.close()


# ------------------------------------------------------------ no root needed

def test_arguments_are_checked_before_anything_is_built() -> None:
    before = netns_names()
    for kwargs in ({"hosts": 0}, {"hosts": 64}, {"hosts": True}, {"nics": 0}, {"nics": 65},
                   {"hosts": 2, "nics": [1]}, {"mtu": 500}, {"rate_mbit": 0},
                   {"rate_mbit": -5}, {"rate_mbit": "100"}, {"nics": 2, "rate_mbit": [1, 2, 3]}):
        with pytest.raises(ValueError):
            testbed.Testbed(**kwargs)
    assert netns_names() == before


def test_tbf_parameters_fit_gso_packets() -> None:
    """The burst holds a 64 KiB GSO packet plus a frame (tbf would otherwise
    segment or drop it) and grows with the rate; the queue is >= 20 ms."""
    for mbit in (1, 10, 200, 1000, 10000, 40000):
        rate, burst, limit = testbed.tbf_params(mbit, 9000)
        assert rate == mbit * 1_000_000
        assert burst >= 65536 + 9000 + 14
        assert burst >= rate / 8 * 0.002 - 1
        assert limit >= 4 * burst and limit >= rate / 8 * 0.02 - 1


def test_unavailable_is_reported_with_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(testbed, "_available_cache", None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ok, why = testbed.available()
    assert not ok and "root" in why
    with pytest.raises(testbed.TestbedError, match="root"):
        testbed.Testbed()
    monkeypatch.setattr(testbed, "_available_cache", None)
    monkeypatch.setattr(testbed.shutil, "which", lambda tool: None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ok, why = testbed.available()
    assert not ok and "nft" in why and "tc" in why


# ------------------------------------------------------------------ layout

def test_layout_every_nic_reaches_every_nic_over_its_own_link(need_testbed) -> None:
    """Host 0 has 2 NICs, host 1 has 3.  A socket bound to NIC i's address
    reaches every NIC j of the other host; the bytes leave through NIC i's
    link and arrive through NIC j's link, and nowhere else.  An unbound
    socket follows the main table: other hosts' NIC j via local NIC j % N."""
    with testbed.Testbed(hosts=2, nics=[2, 3]) as tb:
        assert [len(h.nics) for h in tb.hosts] == [2, 3]
        assert tb.switch.startswith(f"atx{os.getpid()}-") and tb.switch.endswith("-sw")
        for h in tb.hosts:
            assert h.name == f"{tb.name}-h{h.index}"
            links = json.loads(testbed._run(["ip", "-n", h.name, "-j", "addr"]).stdout)
            got = {l["ifname"]: (l["mtu"], [a["local"] for a in l["addr_info"]])
                   for l in links if l["ifname"] != "lo"}
            assert got == {n.ifname: (9000, [n.addr]) for n in h.nics}
        addrs = [n.addr for h in tb.hosts for n in h.nics]
        assert len(set(addrs)) == len(addrs)
        assert all(a.startswith("10.213.") for a in addrs)

        payload = 2 * MiB

        def check(src: int, dst: int, bound: bool) -> None:
            used = src if bound else dst % len(tb.hosts[0].nics)
            before = {(h.index, n.index): tb.link_stats(h, n) for h in tb.hosts for n in h.nics}
            _, peer = transfer(tb, (0, src if bound else None), (1, dst), payload)
            assert peer == tb.hosts[0].nics[used].addr
            for (h, k), b in before.items():
                a = tb.link_stats(h, k)
                tx, rx = a.tx_bytes - b.tx_bytes, a.rx_bytes - b.rx_bytes
                carries = (h, k) in ((0, used), (1, dst))
                moved = tx if h == 0 else rx
                what = f"host{h} nic{k} for nic{src if bound else '?'} -> nic{dst}: tx {tx} rx {rx}"
                if carries:
                    assert moved >= payload, what
                else:
                    assert tx + rx < payload // 20, what

        for src in range(2):
            for dst in range(3):
                check(src, dst, bound=True)
        check(0, 2, bound=False)   # NIC 2 of host 1 -> local NIC 2 % 2 = 0
        check(1, 1, bound=False)


# ----------------------------------------------------------------- shaping

def test_one_shaped_link_measures_its_rate(need_testbed) -> None:
    with testbed.Testbed(hosts=2, nics=2, rate_mbit=[200, None]) as tb:
        assert tb.rate(0, 0) == 200 and tb.rate(1, "nic0") == 200 and tb.rate(0, 1) is None
        mbit, _ = transfer(tb, (0, 0), (1, 0), 6 * MiB)
        assert 170 <= mbit <= 230, f"{mbit:.1f} Mbit/s over a link shaped to 200"
        # cross: shaped NIC 0 of host 0 to the unshaped NIC 1 of host 1
        mbit, _ = transfer(tb, (0, 0), (1, 1), 6 * MiB)
        assert 170 <= mbit <= 230, f"{mbit:.1f} Mbit/s from a NIC shaped to 200"
        # the switch port shapes the other direction: host 1 NIC 1 -> host 0 NIC 0
        mbit, _ = transfer(tb, (1, 1), (0, 0), 6 * MiB)
        assert 170 <= mbit <= 230, f"{mbit:.1f} Mbit/s into a NIC shaped to 200"


def test_two_shaped_links_add_up(need_testbed) -> None:
    with testbed.Testbed(hosts=2, nics=2, rate_mbit=200) as tb:
        rates: dict[int, float] = {}
        errors: list[str] = []

        def run(k: int) -> None:
            try:
                rates[k], _ = transfer(tb, (0, k), (1, k), 6 * MiB)
            except Exception:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        total = sum(rates.values())
        assert 340 <= total <= 460, f"{rates}: {total:.1f} Mbit/s over two links of 200"
        assert all(170 <= r <= 230 for r in rates.values()), rates


def test_shape_changes_and_removes_the_qdiscs(need_testbed) -> None:
    with testbed.Testbed(hosts=2, nics=1) as tb:
        def qdiscs() -> list[str]:
            return [testbed._run(["tc", "-n", ns, "qdisc", "show", "dev", dev]).stdout
                    for ns, dev in ((tb.hosts[0].name, "nic0"), (tb.switch, "h0n0"))]

        assert all("tbf" not in q for q in qdiscs())
        tb.shape(0, 0, 100)
        assert all("tbf" in q and "rate 100Mbit" in q for q in qdiscs()), qdiscs()
        mbit, _ = transfer(tb, (0, 0), (1, 0), 3 * MiB)
        assert 85 <= mbit <= 115, mbit
        tb.shape(tb.hosts[0], tb.hosts[0].nics[0], 400)
        assert all("rate 400Mbit" in q for q in qdiscs()), qdiscs()
        tb.shape(0, "nic0", None)
        tb.shape(0, "nic0", None)  # removing twice is fine
        assert all("tbf" not in q for q in qdiscs()) and tb.rate(0, 0) is None
        with pytest.raises(ValueError):
            tb.shape(0, 0, 0)
        with pytest.raises(IndexError):
            tb.shape(0, 1, 100)


# ---------------------------------------------------------------- cut/heal

def test_cut_stalls_only_that_link_and_heal_resumes_it(need_testbed) -> None:
    with testbed.Testbed(hosts=2, nics=2, rate_mbit=100) as tb:
        streams = [Stream(tb, 0), Stream(tb, 1)]
        try:
            assert all(s.grows_within(5, 256 * 1024) for s in streams)
            tb.cut(0, 0)
            assert tb.is_cut(0, 0) and not tb.is_cut(0, 1)
            time.sleep(0.3)  # what was past the switch drains
            assert not streams[0].grows_within(1.0), "bytes crossed a cut link"
            assert streams[1].grows_within(1.0, 2 * MiB), "the other link stalled too"
            # both directions are dead: connecting to or from the cut NIC times out
            srv = listen(tb, 0, 0)
            with pytest.raises(OSError):
                connect(tb, 1, 0, srv.getsockname(), timeout=0.5)
            srv.close()
            srv = listen(tb, 1, 1)
            with pytest.raises(OSError):
                connect(tb, 0, 0, srv.getsockname(), timeout=0.5)
            connect(tb, 0, 1, srv.getsockname(), timeout=2).close()
            srv.close()

            tb.heal(0, 0)
            tb.heal(0, 0)  # healing twice is fine
            assert not tb.is_cut(0, 0)
            t0 = time.monotonic()
            # the stalled connection resumes at its next retransmission
            assert streams[0].grows_within(10, 256 * 1024), "no bytes after heal"
            resumed = time.monotonic() - t0
            assert resumed < 10
            transfer(tb, (0, 0), (1, 1), 1 * MiB)  # and new connections work

            # "down": the switch port goes down (the host sees no carrier)
            tb.cut(0, 1, how="down")
            time.sleep(0.3)
            assert not streams[1].grows_within(1.0), "bytes crossed a link that is down"
            assert streams[0].grows_within(2.0, 1 * MiB)
            tb.heal(0, 1)
            assert streams[1].grows_within(10, 256 * 1024), "no bytes after the link came up"
        finally:
            for s in streams:
                s.close()


# ---------------------------------------------------------------- teardown

def test_close_leaves_no_namespaces_links_or_processes(need_testbed) -> None:
    links_before = root_links()
    tb = testbed.Testbed(hosts=2, nics=2, rate_mbit=100)
    names = list(tb.namespaces)
    assert len(names) == 3 and set(names) <= netns_names()
    inodes = [netns_inode(n) for n in names]
    sleeper = tb.popen(0, ["sleep", "60"])
    assert tb.run(1, ["ip", "-br", "link"]).stdout.count("nic") == 2
    assert root_links() == links_before, "the testbed touched the calling namespace"
    tb.close()
    assert sleeper.poll() is not None, "a popen() child survived close()"
    assert not set(names) & netns_names()
    assert not [n for n in netns_names() if n.startswith(tb.name + "-")]
    for inode in inodes:
        assert processes_in_netns(inode) == []
    assert root_links() == links_before
    tb.close()  # idempotent
    assert tb.closed
    with pytest.raises(testbed.TestbedError, match="closed"):
        tb.cut(0, 0)
    with pytest.raises(testbed.TestbedError, match="closed"):
        tb.popen(0, ["true"])


_CREATOR = textwrap.dedent("""
    import os, signal, sys, time
    from aiotransfer import testbed
    tb = testbed.Testbed(hosts=2, nics=1)
    print(" ".join(tb.namespaces), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
""")


def start_creator(mode: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", _CREATOR, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    names = line.split()
    assert len(names) == 3, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, names


def test_sigkilled_owner_is_swept_by_the_next_testbed(need_testbed) -> None:
    proc, names = start_creator("kill")
    assert proc.wait(30) == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    assert set(names) <= netns_names(), "the killed creator's namespaces should remain"
    stale = {i.name for i in testbed.list_namespaces() if not i.alive}
    assert set(names) <= stale
    # decoys: a foreign name, and our name pattern without the ownership mark
    decoys = ["atx-not-a-testbed", f"atx{proc.pid}-99-h0"]
    for d in decoys:
        testbed._run(["ip", "netns", "add", d])
    try:
        with testbed.Testbed(hosts=1, nics=1) as tb:
            assert not set(names) & netns_names(), "stale namespaces not swept"
            assert set(tb.namespaces) <= netns_names()
            assert set(decoys) <= netns_names(), "a namespace not made by a testbed was removed"
            assert not set(tb.namespaces) & set(testbed.sweep())  # a live testbed is kept
    finally:
        for d in decoys:
            testbed._run(["ip", "netns", "del", d], check=False)


def test_sigterm_tears_down(need_testbed) -> None:
    proc, names = start_creator("sleep")
    try:
        assert set(names) <= netns_names()
        assert {i.name for i in testbed.list_namespaces() if i.alive} >= set(names)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM, proc.stderr.read()
        assert not set(names) & netns_names()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        testbed.sweep()


def test_cli_up_show_down(need_testbed) -> None:
    cmd = [sys.executable, "-m", "aiotransfer.testbed"]
    up = subprocess.Popen(cmd + ["up", "--hosts", "2", "--nics", "3", "--rate", "300,none,50"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("ready"):
            line = up.stdout.readline()
            assert line, f"'up' ended early: {up.stderr.read()}"
            lines.append(line.rstrip())
        layout = "\n".join(lines)
        assert "nic2" in layout and "10.213.2.5/30" in layout and "rate 50 Mbit/s" in layout
        name = layout.split()[1].rstrip(":")
        assert name.startswith(f"atx{up.pid}-"), layout
        assert {f"{name}-sw", f"{name}-h0", f"{name}-h1"} <= netns_names()
        shown = subprocess.run(cmd + ["show"], capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and f"testbed {name}: owner pid {up.pid}" in shown.stdout
        assert "tbf 300Mbit" in shown.stdout and "tbf 50Mbit" in shown.stdout, shown.stdout
        down = subprocess.run(cmd + ["down"], capture_output=True, text=True, timeout=30)
        assert down.returncode == 0 and name not in down.stdout  # its owner runs
        assert f"{name}-sw" in netns_names()
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.stderr.read()
        assert "removed" in up.stdout.read()
        assert not [n for n in netns_names() if n.startswith(name + "-")]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        up.stdout.close()
        up.stderr.close()
        testbed.sweep()


def test_cli_down_pid_removes_a_running_owners_namespaces(need_testbed) -> None:
    """(``down --all`` is not run here: it would remove the testbeds of
    other test runs on this machine.)"""
    proc, names = start_creator("sleep")
    try:
        out = subprocess.run([sys.executable, "-m", "aiotransfer.testbed", "down",
                              "--pid", str(proc.pid)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert set(names) <= set(out.stdout.split()), out.stdout
        assert not set(names) & netns_names()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ------------------------------------------------- enter() in a spawn child

def _child_enter(conn, ns: str, server: tuple[str, int], src: str) -> None:
    try:
        remounted = testbed.enter(ns)
        names = sorted(name for _, name in socket.if_nameindex())
        sysfs = sorted(os.listdir("/sys/class/net"))
        with socket.create_connection(server, timeout=10, source_address=(src, 0)) as s:
            s.sendall(b"hello from " + ns.encode())
        conn.send(("ok", names, sysfs, remounted))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def test_enter_in_a_spawned_child(need_testbed) -> None:
    ctx = multiprocessing.get_context("spawn")
    with testbed.Testbed(hosts=2, nics=2) as tb:
        srv = listen(tb, 1, 1)
        srv.settimeout(30)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_enter, daemon=True,
                           args=(child, tb.hosts[0].name, srv.getsockname(),
                                 tb.hosts[0].nics[0].addr))
        proc.start()
        try:
            conn, peer = srv.accept()
            assert peer[0] == tb.hosts[0].nics[0].addr
            assert conn.recv(100) == b"hello from " + tb.hosts[0].name.encode()
            conn.close()
            assert parent.poll(30)
            kind, *rest = parent.recv()
            assert kind == "ok", rest[0]
            names, sysfs, remounted = rest
            assert names == ["lo", "nic0", "nic1"]
            if remounted:
                assert sysfs == names
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
            srv.close()
        assert proc.exitcode == 0


def test_enter_rejects_unknown_namespaces() -> None:
    with pytest.raises(FileNotFoundError):
        testbed.enter("atx-no-such-namespace")
    with pytest.raises(ValueError):
        testbed.enter("../etc")


# ------------------------------- the real provider: source address binding

def _engine_receiver(conn, ns: str, nic: str, size: int) -> None:
    try:
        testbed.enter(ns)
        import asyncio

        import numpy as np

        import aiotransfer

        async def main() -> None:
            engine = aiotransfer.TransferEngine("tcp", nics=[nic])
            try:
                await engine.start()
            except aiotransfer.TransferError as exc:
                conn.send(("unavailable", str(exc)))
                return
            try:
                buf = np.zeros(size, np.uint8)
                mr = engine.register(buf)
                conn.send(("ready", mr.descriptor))
                await engine.expect_imm(5, 1, timeout=60)
                conn.send(("done", bool((buf == 7).all())))
                conn.poll(30)
            finally:
                await engine.close()

        asyncio.run(main())
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _engine_writer(conn, ns: str, nic: str, size: int, descriptor: bytes) -> None:
    try:
        testbed.enter(ns)
        import asyncio

        import numpy as np

        import aiotransfer

        async def main() -> None:
            async with aiotransfer.TransferEngine("tcp", nics=[nic]) as engine:
                src = engine.register(np.full(size, 7, np.uint8))
                await asyncio.wait_for(engine.write(src, descriptor, imm=5), 60)
                conn.send(("done",))

        asyncio.run(main())
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _expect(conn, kind: str) -> list:
    assert conn.poll(90), f"no {kind!r} from the child"
    msg = conn.recv()
    if msg[0] == "unavailable":
        pytest.skip(f"tcp provider cannot be opened in a namespace: {msg[1]}")
    assert msg[0] == kind, msg[1] if msg[0] == "error" else msg
    return msg[1:]


def test_tcp_provider_sends_from_the_domains_nic(need_testbed) -> None:
    """tcp;ofi_rxm binds its connecting socket to the domain's address: a
    one-NIC engine on host 0's nic1 writing to an engine on host 1's nic0
    sends through nic1, although the main table would route that destination
    through nic0 (see docs/testbed.md)."""
    size = 16 * MiB
    ctx = multiprocessing.get_context("spawn")
    with testbed.Testbed(hosts=2, nics=2) as tb:
        rx_parent, rx_child = ctx.Pipe()
        wr_parent, wr_child = ctx.Pipe()
        procs = [ctx.Process(target=_engine_receiver, daemon=True,
                             args=(rx_child, tb.hosts[1].name, "nic0", size))]
        procs[0].start()
        try:
            (descriptor,) = _expect(rx_parent, "ready")
            before = {(h.index, n.index): tb.link_stats(h, n) for h in tb.hosts for n in h.nics}
            procs.append(ctx.Process(target=_engine_writer, daemon=True,
                                     args=(wr_child, tb.hosts[0].name, "nic1", size,
                                           descriptor)))
            procs[1].start()
            _expect(wr_parent, "done")
            (intact,) = _expect(rx_parent, "done")
            assert intact
            rx_parent.send("bye")
            delta = {k: (tb.link_stats(*k).tx_bytes - b.tx_bytes,
                         tb.link_stats(*k).rx_bytes - b.rx_bytes) for k, b in before.items()}
            assert delta[(0, 1)][0] >= size, delta      # left through host 0 nic1
            assert delta[(1, 0)][1] >= size, delta      # arrived through host 1 nic0
            assert sum(delta[(0, 0)]) < size // 20, delta
            assert sum(delta[(1, 1)]) < size // 20, delta
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        assert [p.exitcode for p in procs] == [0, 0]
