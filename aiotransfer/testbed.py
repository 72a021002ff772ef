"""A multi-host, multi-NIC test fabric made of Linux network namespaces.

Used by the tests and benchmarks of the multi-NIC engine (docs/testbed.md).
Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip`` (iproute2), ``tc`` and
``nft``.  Everything it creates lives inside network namespaces it created
itself; nothing in the calling namespace is changed and no traffic leaves
the testbed.

Layout (``Testbed(hosts=H, nics=N)``)::

    host namespace atx<pid>-<seq>-h<i>          switch namespace atx<pid>-<seq>-sw
      nic0  10.213.0.<4i+1>/30  ----veth----  h<i>n0  10.213.0.<4i+2>/30
      nic1  10.213.1.<4i+1>/30  ----veth----  h<i>n1  10.213.1.<4i+2>/30
      ...                                      (routes between all links, ip_forward=1)

* Every host NIC is its own veth pair to the "switch" namespace, on its own
  /30 subnet; the switch routes (L3) between them.
* Hosts route by *source* (``ip rule from <nic addr> table 100+k``): a
  packet sent from NIC k's address leaves through NIC k's link, whatever its
  destination (any NIC of any host).  A socket that is not bound to an
  address follows the main table, which sends traffic for the other hosts'
  NIC j through the local NIC ``j % nics`` (with that NIC's address as the
  source).
* Shaping: ``tc tbf`` on both ends of a link (the host's egress and the
  switch port's egress), so each direction is limited to the rate.
* Cutting: the switch port drops every IP packet to or from that link
  (nftables, in the switch namespace); the interfaces stay up.

Ownership: namespace names match ``atx<pid>-<seq>-(sw|h<i>)`` *and* their
loopback device carries the alias ``aiotransfer-testbed pid=<pid>
start=<starttime>``.  Only namespaces with both marks are ever removed.
Teardown happens on ``close()``, at interpreter exit (atexit), on SIGTERM
or SIGHUP (when the process had no handler of its own) and, after a crash
or SIGKILL, on the next ``Testbed()`` / ``python -m aiotransfer.testbed
down`` (stale-owner sweep).

CLI::

    python -m aiotransfer.testbed up --hosts 2 --nics 4 [--rate 1000[,500,..]] [--mtu 9000]
    python -m aiotransfer.testbed show
    python -m aiotransfer.testbed down [--all | --pid PID]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

__all__ = [
    "Testbed", "Host", "Nic", "LinkStats", "TestbedError",
    "available", "enter", "netns", "sweep", "list_namespaces",
    "tbf_params", "main",
]

NETNS_DIR = "/run/netns"
#: Every testbed namespace name starts with this and matches NAME_RE.
PREFIX = "atx"
NAME_RE = re.compile(r"^atx(?P<pid>\d+)-(?P<seq>\d+|probe)-(?P<role>sw|h\d+)$")
#: Alias of the loopback device of every testbed namespace (the ownership mark).
MARK = "aiotransfer-testbed"
_MARK_RE = re.compile(r"^aiotransfer-testbed pid=(?P<pid>\d+) start=(?P<start>\d+)$")

#: Address plan: host i, NIC k -> 10.213.k.(4i+1)/30, switch port 10.213.k.(4i+2).
NET_PREFIX = "10.213"
NET_CIDR = f"{NET_PREFIX}.0.0/16"
MAX_HOSTS = 63
MAX_NICS = 64
#: Policy routing table of NIC k is TABLE_BASE + k, its rule's priority RULE_PREF + k.
TABLE_BASE = 100
RULE_PREF = 1000
NFT_TABLE = "atx_testbed"

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2

HostRef = Union["Host", int, str]
NicRef = Union["Nic", int, str]
Rate = Union[int, float, None]


class TestbedError(RuntimeError):
    """A command building, changing or removing the testbed failed."""

    __test__ = False  # not a pytest test class


# ------------------------------------------------------------------ model

@dataclass(frozen=True)
class Nic:
    """One NIC of a host: the host-side end of a veth pair to the switch.

    ``ifname`` is the interface name inside the host namespace (``nic<k>``,
    usable as a libfabric tcp domain name); ``addr`` its IPv4 address (on a
    /30 of its own); ``gateway`` the switch port's address on that /30;
    ``port`` the switch-side interface name (in the switch namespace)."""

    ifname: str
    addr: str
    index: int
    host_index: int
    gateway: str
    port: str
    prefixlen: int = 30

    @property
    def cidr(self) -> str:
        return f"{self.addr}/{self.prefixlen}"


@dataclass
class Host:
    """A "host": a network namespace with NICs ``nic0`` .. ``nic<N-1>``."""

    name: str
    index: int
    nics: list[Nic] = field(default_factory=list)

    def nic(self, ref: NicRef) -> Nic:
        """The NIC given by index, interface name, address or Nic."""
        if isinstance(ref, Nic):
            if ref.host_index != self.index or ref.index >= len(self.nics):
                raise ValueError(f"{ref} is not a NIC of host {self.index}")
            return self.nics[ref.index]
        if isinstance(ref, bool):
            raise TypeError("nic must be a Nic, an index or an interface name / address")
        if isinstance(ref, int):
            if not 0 <= ref < len(self.nics):
                raise IndexError(f"host {self.index} has no NIC {ref} ({len(self.nics)} NICs)")
            return self.nics[ref]
        if isinstance(ref, str):
            for n in self.nics:
                if ref in (n.ifname, n.addr):
                    return n
            raise ValueError(f"host {self.index} has no NIC {ref!r}")
        raise TypeError("nic must be a Nic, an index or an interface name / address")


@dataclass(frozen=True)
class LinkStats:
    """Counters of an interface (``ip -s link``)."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int
    tx_dropped: int = 0
    rx_dropped: int = 0


def nic_addr(host: int, nic: int) -> tuple[str, str]:
    """(host address, switch port address) of host ``host``'s NIC ``nic``."""
    return f"{NET_PREFIX}.{nic}.{4 * host + 1}", f"{NET_PREFIX}.{nic}.{4 * host + 2}"


# ----------------------------------------------------------------- helpers

def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError as exc:
        raise TestbedError(f"{argv[0]}: not found ({exc})") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{' '.join(argv)}: timed out after {timeout} s") from None
    if check and proc.returncode != 0:
        what = " ".join(argv)
        if input:
            what += " <<< " + " | ".join(line for line in input.splitlines() if line)[:2000]
        raise TestbedError(f"{what}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _ns_name(ref: "Host | str") -> str:
    if isinstance(ref, Host):
        return ref.name
    if isinstance(ref, str):
        return ref
    raise TypeError(f"expected a Host or a namespace name, not {ref!r}")


def _ns_path(name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad namespace name {name!r}")
    path = os.path.join(NETNS_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({path})")
    return path


def _setns_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(fd, CLONE_NEWNET), f"setns({path})")
    finally:
        os.close(fd)


@contextlib.contextmanager
def netns(ref: "Host | str") -> Iterator[None]:
    """Run the body with the *calling thread* in network namespace ``ref``
    (a Host or a namespace name), then switch back.

    Sockets made in the body belong to that namespace for their whole life,
    so this is how a test opens client/server sockets of several hosts in
    one process.  Threads started in the body inherit the namespace; other
    threads are not affected.  Do not start a TransferEngine in the body: its
    later calls may make sockets from other threads (use ``enter()`` in a
    child process instead)."""
    path = _ns_path(_ns_name(ref))
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns_path(path)
        try:
            yield
        finally:
            _check(_libc().setns(old, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(old)


def enter(ref: "Host | str", *, remount_sys: bool = True) -> bool:
    """Move the calling thread (for good) into network namespace ``ref``.

    Meant for the start of a child process (multiprocessing "spawn"), before
    it creates a TransferEngine or any thread: threads already running stay
    where they are, threads started later inherit the namespace.  With
    ``remount_sys`` it also does what ``ip netns exec`` does for /sys (a
    private mount namespace with a fresh sysfs, so /sys/class/net shows the
    namespace's interfaces); the kernel allows that only in a
    single-threaded process (a numpy/OpenBLAS import may already have
    started threads), so it is best effort.  Returns True if /sys was
    remounted."""
    _setns_path(_ns_path(_ns_name(ref)))
    if not remount_sys:
        return False
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount(/, rslave)")
    libc.umount2(b"/sys", _MNT_DETACH)
    _check(libc.mount(_ns_name(ref).encode(), b"/sys", b"sysfs", 0, None), "mount(sysfs)")
    return True


def _proc_start(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ")"
    return int(stat.rsplit(")", 1)[1].split()[19])


def tbf_params(rate_mbit: float, mtu: int = 9000) -> tuple[int, int, int]:
    """(rate bit/s, burst bytes, limit bytes) of the tbf shaping a link to
    ``rate_mbit``.

    The burst must hold the largest packet tbf sees unsegmented: veth passes
    GSO packets up to 64 KiB (TSO of a local TCP socket); a packet larger
    than the burst is software-segmented by tbf (costly) and a segment larger
    than the burst is dropped.  So the burst is at least 64 KiB + one MTU
    frame, or 2 ms at the rate if that is more.  The queue limit is 20 ms at
    the rate (at least 4 bursts): deep enough that a TCP stream is paced by
    the shaper rather than by losses."""
    if isinstance(rate_mbit, bool) or not isinstance(rate_mbit, (int, float)) \
            or not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be a positive number or None, not {rate_mbit!r}")
    rate = int(rate_mbit * 1_000_000)
    burst = max(65536 + mtu + 64, rate // 8 // 500)
    limit = max(4 * burst, rate // 8 // 50)
    return rate, burst, limit


def _tc_qdisc_cmd(dev: str, rate_mbit: Rate, mtu: int) -> str:
    if rate_mbit is None:
        return f"qdisc del dev {dev} root"
    rate, burst, limit = tbf_params(rate_mbit, mtu)
    return f"qdisc replace dev {dev} root tbf rate {rate}bit burst {burst} limit {limit}"


# ------------------------------------------------------ live registry / exit

_live: dict[int, "Testbed"] = {}
_live_lock = threading.RLock()
_hooks_installed = False
_seq = 0
_prev_handlers: dict[int, Any] = {}


def _close_live(reason: str) -> None:
    """Close every testbed this process created (never a forked child's copy)."""
    with _live_lock:
        beds = [tb for tb in _live.values() if tb.owner_pid == os.getpid()]
    for tb in beds:
        try:
            tb.close()
        except Exception as exc:  # keep closing the others
            print(f"aiotransfer.testbed: {reason}: closing {tb.name} failed: {exc}",
                  file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    _close_live(f"signal {signum}")
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    # die of the signal as the process would have without us
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """atexit always; SIGTERM/SIGHUP only where the process left the default
    action (a program with its own handler keeps it, and atexit still runs
    if that handler exits the interpreter)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_live, "atexit")
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                _prev_handlers[sig] = signal.SIG_DFL
                signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


# ------------------------------------------------------------ availability

_available_cache: tuple[bool, str] | None = None


def available(refresh: bool = False) -> tuple[bool, str]:
    """(True, "") if testbeds can be built here, else (False, why).

    Checks root, the ``ip``/``tc``/``nft`` tools, and builds a throw-away
    namespace with a veth pair, a tbf qdisc and an nftables table (so a
    container without CAP_SYS_ADMIN, or a kernel without veth/tbf/nf_tables,
    is reported here rather than as a failing test).  Cached."""
    global _available_cache
    if _available_cache is not None and not refresh:
        return _available_cache
    _available_cache = _probe()
    return _available_cache


def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run as root)"
    missing = [t for t in ("ip", "tc", "nft") if shutil.which(t) is None]
    if missing:
        return False, (f"missing tools: {', '.join(missing)} "
                       f"(Debian: apt-get install iproute2 nftables)")
    name = f"{PREFIX}{os.getpid()}-probe-sw"
    with _live_lock:
        return _probe_in(name)


def _probe_in(name: str) -> tuple[bool, str]:
    _run(["ip", "netns", "del", name], check=False)  # a probe of ours that was interrupted
    try:
        try:
            _run(["ip", "netns", "add", name])
        except TestbedError as exc:
            return False, f"cannot create a network namespace: {exc}"
        try:
            _mark(name)
            _run(["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            _run(["tc", "-n", name] + _tc_qdisc_cmd("p0", 100, 1500).split())
            _run(["ip", "netns", "exec", name, "nft", "-f", "-"],
                 input=_nft_ruleset())
        except TestbedError as exc:
            return False, f"namespace made, but veth/tbf/nftables failed: {exc}"
        return True, ""
    finally:
        _run(["ip", "netns", "del", name], check=False)


# ------------------------------------------------------- names and sweeping

def _new_names(hosts: int) -> list[str]:
    """[switch, host0, host1, ...] namespace names of a new instance."""
    global _seq
    with _live_lock:
        seq = _seq
        _seq += 1
    base = f"{PREFIX}{os.getpid()}-{seq}"
    return [f"{base}-sw"] + [f"{base}-h{i}" for i in range(hosts)]


def _mark(name: str) -> None:
    pid = os.getpid()
    _run(["ip", "-n", name, "link", "set", "dev", "lo", "alias",
          f"{MARK} pid={pid} start={_proc_start(pid)}", "up"])


def _read_mark(name: str) -> tuple[int, int] | None:
    """(pid, start) from a namespace's ownership mark, None if unmarked."""
    proc = _run(["ip", "-n", name, "-j", "link", "show", "dev", "lo"], check=False)
    if proc.returncode != 0:
        return None
    try:
        alias = json.loads(proc.stdout)[0].get("ifalias", "")
    except (ValueError, IndexError, AttributeError):
        return None
    m = _MARK_RE.match(alias or "")
    return (int(m["pid"]), int(m["start"])) if m else None


def _owner_alive(pid: int, start: int) -> bool:
    return _proc_start(pid) == start


@dataclass(frozen=True)
class NamespaceInfo:
    """A testbed namespace found on this machine."""

    name: str
    instance: str      # "atx<pid>-<seq>"
    role: str          # "sw" or "h<i>"
    pid: int
    alive: bool        # its creating process still runs


def list_namespaces() -> list[NamespaceInfo]:
    """Every network namespace made by a testbed (name pattern and mark)."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = NAME_RE.match(name)
        if not m:
            continue
        mark = _read_mark(name)
        if mark is None or mark[0] != int(m["pid"]):
            continue
        out.append(NamespaceInfo(name, name.rsplit("-", 1)[0], m["role"], mark[0],
                                 _owner_alive(*mark)))
    return out


def _delete_namespace(name: str, *, kill: bool = True) -> None:
    """Kill what still runs inside (never this process), then delete."""
    if kill:
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        pids = [int(p) for p in pids if p.isdigit() and int(p) != os.getpid()]
        _kill_pids(pids)
    proc = _run(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
        raise TestbedError(f"ip netns del {name}: {proc.stderr.strip()}")


def _kill_pids(pids: list[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _proc_start(p) is not None and not _zombie(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sweep(*, all: bool = False, pid: int | None = None) -> list[str]:
    """Delete testbed namespaces whose creating process is gone; with
    ``all``, also those of running owners; with ``pid``, only those created
    by that process (running or not).  Never those of this process's open
    testbeds.  Returns the names removed.  Namespaces not made by a testbed
    are never touched."""
    with _live_lock:
        mine = {n for tb in _live.values() for n in tb.namespaces}
    removed = []
    for info in list_namespaces():
        if info.name in mine:
            continue
        if pid is not None and info.pid != pid:
            continue
        if info.alive and not all and pid is None:
            continue
        _delete_namespace(info.name)
        removed.append(info.name)
    return removed


def _nft_ruleset() -> str:
    """The switch's port filter: ports named in set ``cut`` drop all IP."""
    return f"""
table inet {NFT_TABLE} {{
    set cut {{ type ifname; }}
    chain forward {{ type filter hook forward priority -200; policy accept;
        iifname @cut drop
        oifname @cut drop
    }}
    chain input {{ type filter hook input priority -200; policy accept;
        iifname @cut drop
    }}
    chain output {{ type filter hook output priority -200; policy accept;
        oifname @cut drop
    }}
}}
"""


# ----------------------------------------------------------------- Testbed

def _rates(rate_mbit: Rate | Sequence[Rate], nics: int) -> list[Rate]:
    if rate_mbit is None or isinstance(rate_mbit, (int, float)):
        rates = [rate_mbit] * nics
    else:
        rates = list(rate_mbit)
        if len(rates) != nics:
            raise ValueError(f"rate_mbit has {len(rates)} entries for {nics} NICs")
    for r in rates:
        if r is not None:
            tbf_params(r)  # validates
    return rates


class Testbed:
    """Hosts (network namespaces) joined to a routing switch namespace by
    one veth pair per NIC.  Built in the constructor; use as a context
    manager or call ``close()`` (idempotent).

    ``hosts`` -- number of hosts (1..63).
    ``nics`` -- NICs per host (1..64), or a list with a count per host.
    ``rate_mbit`` -- None (unshaped), a rate for every link, or a list with
    a rate (or None) per NIC index.
    ``mtu`` -- MTU of every link (9000 keeps per-packet forwarding CPU low).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, hosts: int = 2, nics: int | Sequence[int] = 4,
                 rate_mbit: Rate | Sequence[Rate] = None, mtu: int = 9000) -> None:
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be an int in 1..{MAX_HOSTS}, not {hosts!r}")
        counts = [nics] * hosts if isinstance(nics, int) else list(nics)
        if len(counts) != hosts or any(isinstance(c, bool) or not isinstance(c, int)
                                       or not 1 <= c <= MAX_NICS for c in counts):
            raise ValueError(f"nics must be an int in 1..{MAX_NICS} or one per host, "
                             f"not {nics!r}")
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 1280 <= mtu <= 65535:
            raise ValueError(f"mtu must be an int in 1280..65535, not {mtu!r}")
        self.mtu = mtu
        self.owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self._sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self._cut: dict[str, str] = {}  # switch port -> how
        self._rates: dict[tuple[int, int], Rate] = {}
        rates = _rates(rate_mbit, max(counts))

        ok, why = available()
        if not ok:
            raise TestbedError(f"testbed unavailable: {why}")
        _install_hooks()
        try:
            sweep()
        except TestbedError as exc:  # a stale leftover must not stop a new testbed
            warnings.warn(f"aiotransfer.testbed: removing stale namespaces: {exc}",
                          RuntimeWarning, stacklevel=2)

        names = _new_names(hosts)
        self.switch: str = names[0]
        self.name: str = self.switch[:-len("-sw")]
        self.hosts: list[Host] = []
        for i, count in enumerate(counts):
            host = Host(names[1 + i], i)
            for k in range(count):
                addr, gw = nic_addr(i, k)
                host.nics.append(Nic(f"nic{k}", addr, k, i, gw, f"h{i}n{k}"))
            self.hosts.append(host)
        self.namespaces: list[str] = []  # those created so far (teardown list)
        with _live_lock:
            _live[id(self)] = self
        try:
            self._build()
            for host in self.hosts:
                for nic in host.nics:
                    if rates[nic.index] is not None:
                        self.shape(host, nic, rates[nic.index])
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ building

    def _build(self) -> None:
        for name in [self.switch] + [h.name for h in self.hosts]:
            _run(["ip", "netns", "add", name])  # fails if the name exists: never adopt one
            self.namespaces.append(name)
            _mark(name)
        common = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
                  "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                  "net.ipv4.conf.all.accept_redirects": 0,
                  "net.ipv4.conf.default.accept_redirects": 0}
        self._sysctl(self.switch, {**common, "net.ipv4.ip_forward": 1,
                                   "net.ipv4.conf.all.send_redirects": 0,
                                   "net.ipv4.conf.default.send_redirects": 0})
        for host in self.hosts:
            self._sysctl(host.name, common)

        sw = []
        for host in self.hosts:
            for nic in host.nics:
                sw.append(f"link add {nic.port} mtu {self.mtu} type veth peer name {nic.ifname}"
                          f" netns {host.name} mtu {self.mtu}")
                sw.append(f"address add {nic.gateway}/{nic.prefixlen} dev {nic.port}")
                sw.append(f"link set dev {nic.port} up")
        _run(["ip", "-n", self.switch, "-batch", "-"], input="\n".join(sw) + "\n")
        _run(["ip", "netns", "exec", self.switch, "nft", "-f", "-"], input=_nft_ruleset())

        widest = max(len(h.nics) for h in self.hosts)
        for host in self.hosts:
            cmds = []
            for nic in host.nics:
                cmds += [f"address add {nic.cidr} dev {nic.ifname}",
                         f"link set dev {nic.ifname} up",
                         f"rule add from {nic.addr} table {TABLE_BASE + nic.index}"
                         f" pref {RULE_PREF + nic.index}",
                         f"route add {NET_CIDR} via {nic.gateway} dev {nic.ifname}"
                         f" src {nic.addr} table {TABLE_BASE + nic.index}"]
            count = len(host.nics)
            for j in range(widest):
                out = host.nics[j % count]
                cmds.append(f"route add {NET_PREFIX}.{j}.0/24 via {out.gateway}"
                            f" dev {out.ifname} src {out.addr}")
            _run(["ip", "-n", host.name, "-batch", "-"], input="\n".join(cmds) + "\n")

    @staticmethod
    def _sysctl(ns: str, values: dict[str, int]) -> None:
        """Set net.* sysctls of a namespace (/proc/sys/net belongs to the
        network namespace of the thread that opens it)."""
        with netns(ns):
            for key, value in values.items():
                with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                    f.write(f"{value}\n")

    # -------------------------------------------------------------- lookup

    def host(self, ref: HostRef) -> Host:
        """The host given by index, namespace name or Host."""
        if isinstance(ref, Host):
            if ref.index < len(self.hosts) and self.hosts[ref.index].name == ref.name:
                return self.hosts[ref.index]
            raise ValueError(f"{ref.name} is not a host of testbed {self.name}")
        if isinstance(ref, bool):
            raise TypeError("host must be a Host, an index or a namespace name")
        if isinstance(ref, int):
            if not 0 <= ref < len(self.hosts):
                raise IndexError(f"testbed {self.name} has no host {ref}")
            return self.hosts[ref]
        if isinstance(ref, str):
            for h in self.hosts:
                if h.name == ref:
                    return h
            raise ValueError(f"testbed {self.name} has no host {ref!r}")
        raise TypeError("host must be a Host, an index or a namespace name")

    def nic(self, host: HostRef, nic: NicRef) -> Nic:
        return self.host(host).nic(nic)

    def _alive(self) -> None:
        if self._closed:
            raise TestbedError(f"testbed {self.name} is closed")

    # ------------------------------------------------------ link controls

    def shape(self, host: HostRef, nic: NicRef, rate_mbit: Rate) -> None:
        """Limit both directions of a link to ``rate_mbit`` (tbf on the
        host's egress and on the switch port's egress); None removes it."""
        with self._lock:
            self._alive()
            h = self.host(host)
            n = h.nic(nic)
            key = (h.index, n.index)
            if rate_mbit is None and self._rates.get(key) is None:
                return
            for ns, dev in ((h.name, n.ifname), (self.switch, n.port)):
                _run(["tc", "-n", ns] + _tc_qdisc_cmd(dev, rate_mbit, self.mtu).split())
            self._rates[key] = rate_mbit

    def rate(self, host: HostRef, nic: NicRef) -> Rate:
        """The shaped rate of a link in Mbit/s, None if unshaped."""
        h = self.host(host)
        return self._rates.get((h.index, h.nic(nic).index))

    def cut(self, host: HostRef, nic: NicRef, how: str = "drop") -> None:
        """Cut a link: ``how="drop"`` (default) makes the switch port drop
        every IP packet both ways (nftables; both interfaces stay up, like a
        dead switch port: TCP connections stall and retransmit), ``"down"``
        sets the switch port down (the host sees NO-CARRIER)."""
        if how not in ("drop", "down"):
            raise ValueError(f"how must be 'drop' or 'down', not {how!r}")
        with self._lock:
            self._alive()
            n = self.nic(host, nic)
            if n.port in self._cut:
                if self._cut[n.port] == how:
                    return
                self.heal(host, nic)
            if how == "drop":
                _run(["ip", "netns", "exec", self.switch, "nft", "add", "element", "inet",
                      NFT_TABLE, "cut", f"{{ {n.port} }}"])
            else:
                _run(["ip", "-n", self.switch, "link", "set", "dev", n.port, "down"])
            self._cut[n.port] = how

    def heal(self, host: HostRef, nic: NicRef) -> None:
        """Undo ``cut`` (no-op if the link is not cut)."""
        with self._lock:
            self._alive()
            n = self.nic(host, nic)
            how = self._cut.pop(n.port, None)
            if how == "drop":
                _run(["ip", "netns", "exec", self.switch, "nft", "delete", "element", "inet",
                      NFT_TABLE, "cut", f"{{ {n.port} }}"])
            elif how == "down":
                _run(["ip", "-n", self.switch, "link", "set", "dev", n.port, "up"])

    def is_cut(self, host: HostRef, nic: NicRef) -> bool:
        return self.nic(host, nic).port in self._cut

    # ------------------------------------------------------------ running

    def popen(self, host: HostRef, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside the host's namespace (``ip netns exec``);
        keyword arguments go to subprocess.Popen.  Processes still running
        at ``close()`` are terminated (then killed)."""
        with self._lock:
            self._alive()
            proc = subprocess.Popen(["ip", "netns", "exec", self.host(host).name, *argv],
                                    **kwargs)
            self._procs.append(proc)
            return proc

    def run(self, host: HostRef, argv: Sequence[str], *, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``argv`` in the host's namespace and wait (text output captured)."""
        self._alive()
        return _run(["ip", "netns", "exec", self.host(host).name, *argv], check=check,
                    timeout=timeout)

    def socket(self, host: HostRef, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket that lives in the host's namespace.  It keeps that
        namespace alive while open, so ``close()`` closes the sockets made
        here that are still open."""
        with self._lock:
            self._alive()
            with netns(self.host(host)):
                sock = socket.socket(family, type, proto)
            self._sockets.add(sock)
            return sock

    def netns(self, host: HostRef) -> contextlib.AbstractContextManager[None]:
        """``with tb.netns(host):`` -- see the module function ``netns``."""
        self._alive()
        return netns(self.host(host))

    def link_stats(self, host: HostRef, nic: NicRef) -> LinkStats:
        """Counters of the host-side interface of a link (tx = sent by the host)."""
        self._alive()
        h = self.host(host)
        out = _run(["ip", "-n", h.name, "-s", "-j", "link", "show", "dev",
                    h.nic(nic).ifname]).stdout
        st = json.loads(out)[0]["stats64"]
        return LinkStats(st["tx"]["bytes"], st["tx"]["packets"], st["rx"]["bytes"],
                         st["rx"]["packets"], st["tx"]["dropped"], st["rx"]["dropped"])

    # ------------------------------------------------------------ teardown

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the processes started by ``popen``, kill anything else still
        running in the testbed's namespaces (except this process) and delete
        the namespaces (which destroys their veths, qdiscs and rules).
        Idempotent; safe to call from atexit or a signal handler."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                live = [p for p in self._procs if p.poll() is None]
                for p in live:
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
                deadline = time.monotonic() + 3
                for p in live:
                    try:
                        p.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            p.wait(5)
                for sock in list(self._sockets):
                    with contextlib.suppress(OSError):
                        sock.close()
                errors = []
                for name in reversed(self.namespaces):
                    try:
                        _delete_namespace(name)
                    except Exception as exc:
                        errors.append(str(exc))
                if errors:
                    raise TestbedError("; ".join(errors))
            finally:
                with _live_lock:
                    _live.pop(id(self), None)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        counts = sorted({len(h.nics) for h in self.hosts})
        return (f"<Testbed {self.name} {len(self.hosts)} hosts x "
                f"{counts[0] if len(counts) == 1 else counts} NICs {state}>")

    def describe(self) -> str:
        """A human-readable layout."""
        lines = [f"testbed {self.name}: {len(self.hosts)} hosts, MTU {self.mtu}, "
                 f"switch namespace {self.switch} (owner pid {self.owner_pid})"]
        for h in self.hosts:
            lines.append(f"  host {h.index}: namespace {h.name}")
            for n in h.nics:
                rate = self._rates.get((h.index, n.index))
                extra = f"  rate {rate:g} Mbit/s" if rate is not None else "  unshaped"
                if n.port in self._cut:
                    extra += f"  CUT ({self._cut[n.port]})"
                lines.append(f"    {n.ifname:6} {n.cidr:18} gw {n.gateway:15} "
                             f"switch port {n.port}{extra}")
        lines.append(f"  run a command on host 0: ip netns exec {self.hosts[0].name} <cmd>")
        return "\n".join(lines)


# --------------------------------------------------------------------- CLI

def _parse_rate(text: str | None) -> Rate | list[Rate]:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    vals: list[Rate] = [None if p in ("", "none", "-") else float(p) for p in parts]
    return vals[0] if len(vals) == 1 else vals


def _show() -> str:
    infos = list_namespaces()
    if not infos:
        return "no testbed namespaces"
    lines = []
    for inst in sorted({i.instance for i in infos}):
        members = [i for i in infos if i.instance == inst]
        state = "owner running" if members[0].alive else "STALE (owner gone)"
        lines.append(f"testbed {inst}: owner pid {members[0].pid}, {state}")
        for info in members:
            proc = _run(["ip", "-n", info.name, "-br", "address"], check=False)
            addrs = [ln for ln in proc.stdout.splitlines() if not ln.startswith("lo ")]
            qd = _run(["tc", "-n", info.name, "qdisc", "show"], check=False).stdout
            rates = dict(re.findall(r"qdisc tbf \S+ dev (\S+) root .*?rate (\S+)", qd))
            cut = ""
            if info.role == "sw":
                nft = _run(["ip", "netns", "exec", info.name, "nft", "list", "set", "inet",
                            NFT_TABLE, "cut"], check=False).stdout
                m = re.search(r"elements = \{([^}]*)\}", nft)
                cut = f"  cut: {m[1].strip()}" if m else ""
            lines.append(f"  {info.name}{cut}")
            for ln in addrs:
                dev = ln.split()[0].split("@")[0]
                lines.append(f"    {ln}" + (f"  tbf {rates[dev]}" if dev in rates else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aiotransfer.testbed",
        description="Network-namespace test fabric (hosts x NICs behind a routing switch).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a testbed, print it, wait for Ctrl-C/SIGTERM, tear down")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--nics", type=int, default=4)
    up.add_argument("--rate", default=None,
                    help="Mbit/s for every link, or a comma list per NIC index")
    up.add_argument("--mtu", type=int, default=9000)
    down = sub.add_parser("down", help="remove testbed namespaces whose creator is gone")
    down.add_argument("--all", action="store_true",
                      help="remove every testbed namespace, also those of running owners")
    down.add_argument("--pid", type=int, default=None,
                      help="remove only the namespaces created by this process (running or not)")
    sub.add_parser("show", help="list testbed namespaces")
    args = parser.parse_args(argv)

    if args.cmd == "show":
        print(_show())
        return 0
    if args.cmd == "down":
        removed = sweep(all=args.all, pid=args.pid)
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        return 0

    ok, why = available()
    if not ok:
        print(f"testbed unavailable: {why}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    tb = Testbed(hosts=args.hosts, nics=args.nics, rate_mbit=_parse_rate(args.rate),
                 mtu=args.mtu)
    try:
        print(tb.describe())
        print("ready (Ctrl-C or SIGTERM tears it down)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        tb.close()
    print(f"testbed {tb.name} removed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
