"""Which NICs and CPUs are close to each GPU, read from sysfs.

The paper's TransferEngine runs one engine per GPU over the NICs that sit next
to that GPU on the PCIe fabric, with its worker thread pinned to a core of the
GPU's NUMA node.  This module finds those groups from a sysfs tree (the real
``/sys`` or a copy of one, such as the synthetic trees under
``tests/fixtures/sysfs``) and never needs a GPU, a driver or root::

    from aiotransfer import topology
    topo = topology.detect()                  # sysfs="/sys"
    group = topo.group_for_gpu(0)
    engine = TransferEngine("verbs", nics=group.domains("verbs")[:1],
                            cpu=topo.worker_cpu(group))

:func:`detect` never raises on odd or missing sysfs entries: a file it cannot
read or parse, a broken or looping symlink, a missing directory only removes
that piece of information (a NUMA node becomes ``None``, a link speed
``None``, a device without a PCI parent has ``pci=None`` ...).  The grouping
rule is described in :func:`group` and in docs/topology.md.
"""
from __future__ import annotations

import errno
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["Gpu", "Nic", "Core", "Group", "Topology", "detect", "group", "format_groups",
           "parse_cpulist", "format_cpulist", "parse_ib_rate", "GPU_VENDORS", "GPU_CLASSES"]

#: PCI vendor ids counted as GPU vendors, with the short name shown by ``info``.
GPU_VENDORS: dict[int, str] = {0x10DE: "nvidia", 0x1002: "amd"}
#: PCI class codes (class << 8 | subclass) of GPUs: VGA, 3D controller, other display
#: controller (AMD Instinct MI100-MI250) and processing accelerator (AMD MI300).
GPU_CLASSES: frozenset[int] = frozenset({0x0300, 0x0302, 0x0380, 0x1200})
#: Amazon's PCI vendor id: an EFA device's libfabric domain is ``<ibdev>-rdm``.
_AMAZON = 0x1D0F

_BDF = re.compile(r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_HOST_BRIDGE = re.compile(r"pci[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}")
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)b(?:it)?(?:/s|/sec|ps)?\b", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MAX_HOPS = 64      # symlinks followed while resolving one path (loops end here)
_MAX_READ = 65536   # bytes read from one sysfs attribute


# ------------------------------------------------------------------ records

@dataclass(frozen=True)
class Gpu:
    """A GPU found on the PCI bus."""

    #: position in PCI address order (CUDA_DEVICE_ORDER=PCI_BUS_ID numbering,
    #: before any CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES remapping)
    index: int
    #: PCI address, e.g. ``"0000:18:00.0"``
    pci: str
    #: PCI vendor id (0x10de NVIDIA, 0x1002 AMD)
    vendor: int
    #: PCI device id, None if unreadable
    device: int | None
    #: NUMA node, None if unknown (sysfs says -1 or nothing)
    numa_node: int | None
    #: PCI addresses of the upstream bridges, root port first, the GPU excluded
    pci_path: tuple[str, ...] = ()
    #: host bridge (root complex) it hangs from, e.g. ``"pci0000:15"``
    pci_root: str | None = None

    @property
    def vendor_name(self) -> str:
        return GPU_VENDORS.get(self.vendor, f"0x{self.vendor:04x}")


@dataclass(frozen=True)
class Nic:
    """A network device: a PCI function with its netdev(s) and/or RDMA (ib) device."""

    #: the RDMA device name if there is one (``"mlx5_0"``, EFA ``"rdmap16s27"``), else the netdev
    name: str
    #: kernel network interfaces of this device (``["ibp24s0"]``, ``["ens1f0"]``), maybe empty
    netdevs: tuple[str, ...]
    #: RDMA device under /sys/class/infiniband, None if none
    ib_device: str | None
    #: PCI address of the function, None if it has no PCI parent (virtual devices)
    pci: str | None
    numa_node: int | None
    #: link speed in bit/s, None if unknown or link down
    link_speed: int | None
    pci_path: tuple[str, ...] = ()
    pci_root: str | None = None
    vendor: int | None = None
    driver: str | None = None
    #: True for a device without hardware behind it (veth, bridge, lo ...); these
    #: are listed only when the machine has no other NIC (see :func:`detect`)
    virtual: bool = False

    @property
    def domain_names(self) -> list[str]:
        """Names libfabric may use as this NIC's domain: its netdevs (tcp, udp,
        sockets), then its RDMA device (verbs; EFA adds ``-rdm``)."""
        names = list(self.netdevs)
        if self.ib_device:
            names.append(self.domain("efa") if self.vendor == _AMAZON else self.ib_device)
        return names

    def domain(self, provider: str) -> str | None:
        """The libfabric domain name of this NIC for ``provider`` (``"tcp"``,
        ``"verbs;ofi_rxm"``, ``"efa"`` ...), None if that provider cannot use it.

        verbs: the RDMA device; efa: ``<rdma device>-rdm``; socket-based
        providers (tcp, udp, sockets ...): the first netdev."""
        core = {p.strip().lower() for p in provider.split(";")}
        if "efa" in core:
            return f"{self.ib_device}-rdm" if self.ib_device else None
        if "verbs" in core:
            return self.ib_device
        return self.netdevs[0] if self.netdevs else None


@dataclass(frozen=True)
class Core:
    """A physical CPU core: its online (and allowed) hyperthreads."""

    #: the logical CPU that stands for the core (its lowest thread)
    cpu: int
    #: every usable logical CPU of the core, ``cpu`` first
    threads: tuple[int, ...]
    package: int | None = None
    core_id: int | None = None
    numa_node: int | None = None


@dataclass
class Group:
    """A GPU (or, on a box without GPUs, a NUMA node) with its NICs and cores."""

    index: int
    #: None on a box without GPU
    gpu: Gpu | None
    #: closest first; a NIC appears in several groups only when some GPU had
    #: no NIC of its own (see :func:`group`)
    nics: list[Nic]
    #: physical cores reserved for this group, one logical CPU per core
    cpus: list[int]
    numa_node: int | None

    def domains(self, provider: str) -> list[str]:
        """Domain names of this group's NICs usable by ``provider`` (see :meth:`Nic.domain`)."""
        out = []
        for nic in self.nics:
            name = nic.domain(provider)
            if name and name not in out:
                out.append(name)
        return out


@dataclass
class Topology:
    """What :func:`detect` found."""

    #: the sysfs root that was read
    sysfs: str
    #: in PCI address order
    gpus: list[Gpu]
    #: physical NICs in PCI order (virtual ones only if no physical NIC exists)
    nics: list[Nic]
    #: NUMA node (None: unknown) -> one logical CPU per physical core, ascending
    cpus: dict[int | None, list[int]]
    #: every usable physical core, by representative CPU
    cores: list[Core] = field(default_factory=list)
    #: NUMA node ids present in sysfs (memory-only nodes included)
    numa_nodes: list[int] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def group_for_gpu(self, gpu: int | str) -> Group:
        """The group of GPU ``gpu``: its index (PCI order) or its PCI address
        (``"0000:18:00.0"``; NVML's 8-digit domain form is accepted too)."""
        if isinstance(gpu, str):
            want = _norm_bdf(gpu)
            for grp in self.groups:
                if grp.gpu is not None and _norm_bdf(grp.gpu.pci) == want:
                    return grp
        else:
            for grp in self.groups:
                if grp.gpu is not None and grp.gpu.index == gpu:
                    return grp
        raise KeyError(f"no GPU {gpu!r} in this topology ({len(self.gpus)} GPUs)")

    def worker_cpu(self, group: Group, k: int = 0) -> int | None:
        """A logical CPU to pin the worker of the ``k``-th engine of ``group`` to.

        Engines 0, 1, ... of a group get the group's physical cores in order (one
        logical CPU each); past the last core they get the cores' second
        hyperthreads, then it wraps.  Groups own disjoint cores whenever their
        NUMA node has at least one core per group, so the workers of different
        groups never share a core then.  None when no CPU is known."""
        order = _thread_order(group.cpus, {c.cpu: c for c in self.cores})
        if not order:
            everything = [c.cpu for c in self.cores]
            if not everything:
                return None
            order = everything
        return order[k % len(order)]

    def core_of(self, cpu: int) -> Core | None:
        """The physical core that logical CPU ``cpu`` belongs to."""
        for core in self.cores:
            if cpu in core.threads:
                return core
        return None


def _thread_order(cpus: list[int], by_rep: dict[int, Core]) -> list[int]:
    order = list(cpus)
    depth = max((len(by_rep[c].threads) for c in cpus if c in by_rep), default=1)
    for level in range(1, depth):
        order += [by_rep[c].threads[level] for c in cpus
                  if c in by_rep and len(by_rep[c].threads) > level]
    return order


# ------------------------------------------------------------------ parsing

def parse_cpulist(text: str | None) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]``; bad pieces are skipped."""
    out: set[int] = set()
    for piece in (text or "").strip().split(","):
        piece = piece.strip()
        if not piece:
            continue
        lo, _, hi = piece.partition("-")
        try:
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            continue
        if 0 <= a <= b and b - a < 1 << 16:
            out.update(range(a, b + 1))
    return sorted(out)


def format_cpulist(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    vals = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ib_rate(text: str | None) -> int | None:
    """An RDMA port's ``rate`` file (``"400 Gb/sec (4X NDR)"``) in bit/s, None if unparsable or 0."""
    m = _RATE.match(text or "")
    if not m:
        return None
    bps = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    return bps or None


def _parse_int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), base)
    except ValueError:
        return None


def _numa(text: str | None) -> int | None:
    val = _parse_int(text)
    return val if val is not None and val >= 0 else None


def _norm_bdf(addr: str) -> str:
    parts = addr.strip().lower().split(":")
    if len(parts) == 3:
        parts[0] = f"{int(parts[0], 16):04x}" if re.fullmatch(r"[0-9a-f]+", parts[0]) else parts[0]
    elif len(parts) == 2:
        parts.insert(0, "0000")
    return ":".join(parts)


# ------------------------------------------------------------------ sysfs access

class _Sysfs:
    """Reads a sysfs tree rooted anywhere.  Symlinks are resolved inside the
    root (as if it were chroot'ed at /sys): relative targets as usual, absolute
    ``/sys/...`` targets mapped into the root, anything else unresolvable."""

    def __init__(self, root: str) -> None:
        self.root = root

    def resolve(self, rel: str) -> str | None:
        """``rel`` (relative to the root) with every symlink followed, as a path
        relative to the root; None if some component is missing, unreadable,
        points outside sysfs or loops."""
        pending = [p for p in rel.split("/") if p][::-1]
        out: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            out.append(part)
            try:
                target = os.readlink(os.path.join(self.root, *out))
            except OSError as exc:
                if exc.errno == errno.EINVAL:     # exists, not a symlink
                    continue
                return None
            except (ValueError, UnicodeError):    # NUL byte, undecodable name
                return None
            out.pop()
            hops += 1
            if hops > _MAX_HOPS:
                return None
            if target.startswith("/"):
                if target != "/sys" and not target.startswith("/sys/"):
                    return None
                target = target[4:]
                out = []
            pending.extend(p for p in reversed(target.split("/")) if p)
        return "/".join(out)

    def read(self, rel: str) -> str | None:
        """Content of a sysfs attribute, stripped; None if it cannot be read."""
        path = self.resolve(rel)
        if path is None:
            return None
        try:
            with open(os.path.join(self.root, path), "rb") as f:
                data = f.read(_MAX_READ)
        except (OSError, ValueError):
            return None
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None

    def listdir(self, rel: str) -> list[str]:
        path = self.resolve(rel)
        if path is None:
            return []
        try:
            return sorted(os.listdir(os.path.join(self.root, path)))
        except (OSError, ValueError):
            return []


@dataclass
class _PciPlace:
    """Where a device dir sits in the PCI tree."""
    pci: str | None = None
    pci_path: tuple[str, ...] = ()
    pci_root: str | None = None
    pci_dir: str | None = None     # resolved dir of the PCI function


def _pci_place(devpath: str | None) -> _PciPlace:
    if not devpath:
        return _PciPlace()
    parts = devpath.split("/")
    root = next((p for p in parts if _HOST_BRIDGE.fullmatch(p)), None)
    idx = [i for i, p in enumerate(parts) if _BDF.fullmatch(p)]
    if not idx:
        return _PciPlace(pci_root=root)
    last = idx[-1]
    return _PciPlace(pci=parts[last].lower(),
                     pci_path=tuple(parts[i].lower() for i in idx[:-1]),
                     pci_root=root,
                     pci_dir="/".join(parts[:last + 1]))


# ------------------------------------------------------------------ detection

def detect(sysfs: str = "/sys", *, cpus_allowed: Iterable[int] | None = None) -> Topology:
    """Read GPUs, NICs and CPU cores from ``sysfs`` and group them.

    ``cpus_allowed`` restricts the CPUs considered (a worker cannot be pinned
    outside the process's affinity mask).  Default: this process's
    ``os.sched_getaffinity(0)`` when ``sysfs`` is the real ``/sys``, every
    online CPU otherwise.

    NICs: ``/sys/class/infiniband/*`` and ``/sys/class/net/*``, merged per
    device (an RDMA device and the netdevs under the same PCI function are one
    :class:`Nic`).  Virtual netdevs (no ``device`` link, or living under
    ``devices/virtual``: lo, veth, bridges, bonds, ifb, tun ...) are skipped;
    only when no physical NIC exists are the virtual ones other than ``lo``
    listed, and ``lo`` only when nothing else exists (a container whose only
    interface is a veth still gets a usable group).

    Never raises on odd sysfs content: missing or unreadable pieces are left
    out (None / empty)."""
    sysfs = os.fspath(sysfs)
    fs = _Sysfs(sysfs)
    gpus = _find_gpus(fs)
    nics = _find_nics(fs)
    allowed: set[int] | None
    if cpus_allowed is not None:
        allowed = set(cpus_allowed)
    elif os.path.realpath(sysfs) == "/sys" and hasattr(os, "sched_getaffinity"):
        try:
            allowed = set(os.sched_getaffinity(0))
        except OSError:
            allowed = None
    else:
        allowed = None
    cores, numa_nodes = _find_cores(fs, allowed)
    cpus: dict[int | None, list[int]] = {}
    for core in cores:
        cpus.setdefault(core.numa_node, []).append(core.cpu)
    topo = Topology(sysfs=sysfs, gpus=gpus, nics=nics, cpus=cpus, cores=cores,
                    numa_nodes=numa_nodes)
    topo.groups = group(topo)
    return topo


def _find_gpus(fs: _Sysfs) -> list[Gpu]:
    found = []
    for name in fs.listdir("bus/pci/devices"):
        if not _BDF.fullmatch(name):
            continue
        base = f"bus/pci/devices/{name}"
        cls = _parse_int(fs.read(f"{base}/class"), 16)
        vendor = _parse_int(fs.read(f"{base}/vendor"), 16)
        if cls is None or vendor not in GPU_VENDORS or (cls >> 8) not in GPU_CLASSES:
            continue
        place = _pci_place(fs.resolve(base))
        found.append((place.pci or name.lower(), vendor, base, place))
    found.sort(key=lambda t: t[0])
    return [Gpu(index=i, pci=pci, vendor=vendor, device=_parse_int(fs.read(f"{base}/device"), 16),
                numa_node=_numa(fs.read(f"{base}/numa_node")), pci_path=place.pci_path,
                pci_root=place.pci_root)
            for i, (pci, vendor, base, place) in enumerate(found)]


@dataclass
class _NicDraft:
    key: str
    netdevs: list[str] = field(default_factory=list)
    ib_device: str | None = None
    device_dir: str | None = None
    net_speed: int | None = None
    ib_speed: int | None = None
    virtual: bool = False


def _net_speed(fs: _Sysfs, netdev_dir: str) -> int | None:
    mbps = _parse_int(fs.read(f"{netdev_dir}/speed"))
    return mbps * 1_000_000 if mbps is not None and mbps > 0 else None


def _ib_speed(fs: _Sysfs, ib_dir: str) -> int | None:
    ports = [p for p in fs.listdir(f"{ib_dir}/ports") if p.isdigit()]
    for port in sorted(ports, key=int):
        bps = parse_ib_rate(fs.read(f"{ib_dir}/ports/{port}/rate"))
        if bps:
            return bps
    return None


def _find_nics(fs: _Sysfs) -> list[Nic]:
    drafts: dict[str, _NicDraft] = {}
    by_netdev: dict[str, _NicDraft] = {}
    soft_ib: list[tuple[str, str | None, int | None]] = []

    for name in fs.listdir("class/net"):
        entry = f"class/net/{name}"
        path = fs.resolve(entry)
        if path is None:                       # broken link
            continue
        dev = fs.resolve(f"{entry}/device")
        virtual = dev is None or path.startswith("devices/virtual/")
        key = f"dev:{dev}" if not virtual else f"virt:{name}"
        d = drafts.setdefault(key, _NicDraft(key, device_dir=None if virtual else dev,
                                             virtual=virtual))
        d.netdevs.append(name)
        if d.net_speed is None:
            d.net_speed = _net_speed(fs, entry)
        by_netdev[name] = d

    for name in fs.listdir("class/infiniband"):
        entry = f"class/infiniband/{name}"
        path = fs.resolve(entry)
        if path is None:
            continue
        dev = fs.resolve(f"{entry}/device")
        speed = _ib_speed(fs, entry)
        if dev is None or path.startswith("devices/virtual/"):
            soft_ib.append((name, fs.read(f"{entry}/parent"), speed))
            continue
        d = drafts.get(f"dev:{dev}")
        if d is None:
            # a netdev listed under the device's net/ but reached another way
            for nd in fs.listdir(f"{dev}/net"):
                if nd in by_netdev and not by_netdev[nd].virtual:
                    d = by_netdev[nd]
                    break
        if d is None:
            d = drafts.setdefault(f"dev:{dev}", _NicDraft(f"dev:{dev}", device_dir=dev))
        if d.ib_device is None:
            d.ib_device, d.ib_speed = name, speed
        else:                                  # two RDMA devices on one function: keep both
            key = f"dev:{dev}#{name}"
            drafts[key] = _NicDraft(key, device_dir=dev, ib_device=name, ib_speed=speed)

    for name, parent, speed in soft_ib:        # rxe & co: attach to their netdev
        d = by_netdev.get(parent or "")
        if d is not None and d.ib_device is None:
            d.ib_device, d.ib_speed = name, speed
        else:
            key = f"virt-ib:{name}"
            drafts[key] = _NicDraft(key, ib_device=name, ib_speed=speed, virtual=True)

    nics = [_finish_nic(fs, d) for d in drafts.values()]
    physical = sorted((n for n in nics if not n.virtual), key=lambda n: (n.pci or "~", n.name))
    if physical:
        return physical
    virtual = sorted((n for n in nics if n.virtual and n.name != "lo"), key=lambda n: n.name)
    return virtual or [n for n in nics if n.name == "lo"]


def _finish_nic(fs: _Sysfs, d: _NicDraft) -> Nic:
    place = _pci_place(d.device_dir)
    numa = vendor = driver = None
    if d.device_dir:
        numa = _numa(fs.read(f"{d.device_dir}/numa_node"))
        if numa is None and place.pci_dir and place.pci_dir != d.device_dir:
            numa = _numa(fs.read(f"{place.pci_dir}/numa_node"))
        vendor = _parse_int(fs.read(f"{place.pci_dir or d.device_dir}/vendor"), 16)
        drv = fs.resolve(f"{d.device_dir}/driver")
        driver = drv.rsplit("/", 1)[-1] if drv else None
    netdevs = tuple(sorted(set(d.netdevs)))
    return Nic(name=d.ib_device or (netdevs[0] if netdevs else d.key),
               netdevs=netdevs, ib_device=d.ib_device, pci=place.pci, numa_node=numa,
               link_speed=d.ib_speed or d.net_speed, pci_path=place.pci_path,
               pci_root=place.pci_root, vendor=vendor, driver=driver, virtual=d.virtual)


def _find_cores(fs: _Sysfs, allowed: set[int] | None) -> tuple[list[Core], list[int]]:
    base = "devices/system/cpu"
    ids = sorted(int(n[3:]) for n in fs.listdir(base) if re.fullmatch(r"cpu[0-9]+", n))
    node_ids = sorted(int(n[4:]) for n in fs.listdir("devices/system/node")
                      if re.fullmatch(r"node[0-9]+", n))
    node_of: dict[int, int] = {}
    for node in node_ids:
        for cpu in parse_cpulist(fs.read(f"devices/system/node/node{node}/cpulist")):
            node_of.setdefault(cpu, node)
    if not ids:                                # no cpuN dirs: one core per CPU of the node lists
        ids = sorted(node_of)
    online_text = fs.read(f"{base}/online")
    online = set(parse_cpulist(online_text)) if online_text else None

    def usable(cpu: int) -> bool:
        if online is not None and online and cpu not in online:
            return False
        if online is None and fs.read(f"{base}/cpu{cpu}/online") == "0":
            return False
        return True

    cand = [c for c in ids if usable(c)]
    if allowed is not None and any(c in allowed for c in cand):
        cand = [c for c in cand if c in allowed]
    usable_set = set(cand)
    # a core = CPUs joined by their siblings lists; a CPU without one joins the
    # CPUs of the same (package, core_id), else stands alone
    parent = {c: c for c in cand}

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    ids_of: dict[int, tuple[int | None, int | None]] = {}
    no_siblings = []
    for cpu in cand:
        topo = f"{base}/cpu{cpu}/topology"
        sib = parse_cpulist(fs.read(f"{topo}/thread_siblings_list")
                            or fs.read(f"{topo}/core_cpus_list"))
        ids_of[cpu] = (_parse_int(fs.read(f"{topo}/physical_package_id")),
                       _parse_int(fs.read(f"{topo}/core_id")))
        if cpu in sib:
            for other in sib:
                if other in usable_set:
                    union(cpu, other)
        else:
            no_siblings.append(cpu)
    first_of: dict[tuple[int, int], int] = {}
    for cpu in cand:
        pkg, cid = ids_of[cpu]
        if pkg is not None and cid is not None:
            first_of.setdefault((pkg, cid), cpu)
    for cpu in no_siblings:
        pkg, cid = ids_of[cpu]
        if pkg is not None and cid is not None:
            union(cpu, first_of[(pkg, cid)])
    members: dict[int, list[int]] = {}
    for cpu in cand:
        members.setdefault(find(cpu), []).append(cpu)
    cores = []
    for threads in members.values():
        threads.sort()
        pkg, cid = ids_of[threads[0]]
        cores.append(Core(cpu=threads[0], threads=tuple(threads), package=pkg, core_id=cid,
                          numa_node=node_of.get(threads[0])))
    cores.sort(key=lambda c: c.cpu)
    return cores, node_ids


# ------------------------------------------------------------------ grouping

def _ancestry(dev: Gpu | Nic) -> list[str]:
    return ([dev.pci_root] if dev.pci_root else []) + list(dev.pci_path)


def _affinity(gpu: Gpu, nic: Nic) -> tuple[int, int]:
    """(PCIe levels shared, same NUMA node): compared as a tuple, bigger is closer.

    Levels shared: 0 different host bridges, 1 same host bridge (root complex),
    2 same root port, 3 or more same PCIe switch (deeper switches count more)."""
    depth = 0
    for a, b in zip(_ancestry(gpu), _ancestry(nic)):
        if a != b:
            break
        depth += 1
    same_numa = int(gpu.numa_node is not None and gpu.numa_node == nic.numa_node)
    return depth, same_numa


def group(topo: Topology) -> list[Group]:
    """Group GPUs, NICs and cores (what :func:`detect` stores in ``topo.groups``).

    With GPUs, one group per GPU in PCI order:

    1. every NIC goes to the GPU it is closest to: the deepest common PCIe
       ancestor wins (same PCIe switch > same root port > same host bridge),
       then the same NUMA node.  NICs tied between several GPUs are split evenly
       among them, in PCI order (the first GPUs get the first NICs);
    2. a GPU left without NIC then shares one: the least shared NIC of its NUMA
       node, else the least shared NIC of the machine (round robin).

    Without GPU: one group per NUMA node that has cores or NICs, each with the
    NICs of its node (NICs of unknown node go to the group with fewest NICs; a
    node without NIC shares the least shared one); a single group holding
    everything when at most one node is known.

    Cores: the physical cores of a group's NUMA node (all cores if the node is
    unknown) are split into contiguous, disjoint slices among the groups of
    that node; if a node has fewer cores than groups, groups share them round
    robin."""
    if topo.gpus:
        groups = _gpu_groups(topo)
    else:
        groups = _node_groups(topo)
    _assign_cpus(topo, groups)
    return groups


def _least_shared(pool: list[Nic], usage: Counter) -> Nic:
    return min(pool, key=lambda n: (usage[n.pci or n.name], n.pci or "~", n.name))


def _gpu_groups(topo: Topology) -> list[Group]:
    gpus, nics = topo.gpus, topo.nics
    owned: dict[int, list[tuple[tuple[int, int], Nic]]] = {g.index: [] for g in gpus}
    by_candidates: dict[tuple[int, ...], list[tuple[tuple[int, int], Nic]]] = {}
    for nic in nics:
        scores = [(_affinity(g, nic), g.index) for g in gpus]
        best = max(s for s, _ in scores)
        tied = tuple(i for s, i in scores if s == best)
        by_candidates.setdefault(tied, []).append((best, nic))
    for tied, members in sorted(by_candidates.items(),
                                key=lambda kv: (len(kv[0]), kv[1][0][1].pci or "~")):
        members.sort(key=lambda m: (m[1].pci or "~", m[1].name))
        counts = dict.fromkeys(tied, 0)
        for _ in members:                      # even split, least loaded first
            i = min(tied, key=lambda j: (len(owned[j]) + counts[j], j))
            counts[i] += 1
        pos = 0
        for i in tied:                         # contiguous slices in PCI order
            owned[i].extend(members[pos:pos + counts[i]])
            pos += counts[i]
    usage: Counter = Counter()
    for lst in owned.values():
        for _, nic in lst:
            usage[nic.pci or nic.name] += 1
    groups = []
    for g in gpus:
        mine = [nic for _, nic in sorted(owned[g.index],
                                         key=lambda m: (-m[0][0], -m[0][1], m[1].pci or "~"))]
        if not mine and nics:
            pool = [n for n in nics if g.numa_node is not None and n.numa_node == g.numa_node]
            pick = _least_shared(pool or nics, usage)
            usage[pick.pci or pick.name] += 1
            mine = [pick]
        groups.append(Group(index=g.index, gpu=g, nics=mine, cpus=[], numa_node=g.numa_node))
    return groups


def _node_groups(topo: Topology) -> list[Group]:
    nodes = sorted({n for n in topo.cpus if n is not None}
                   | {n.numa_node for n in topo.nics if n.numa_node is not None})
    if len(nodes) <= 1:
        return [Group(index=0, gpu=None, nics=list(topo.nics), cpus=[],
                      numa_node=nodes[0] if nodes else None)]
    nics_of: dict[int, list[Nic]] = {n: [] for n in nodes}
    for nic in topo.nics:
        if nic.numa_node is not None:
            nics_of[nic.numa_node].append(nic)
    for nic in topo.nics:
        if nic.numa_node is None:
            nics_of[min(nodes, key=lambda n: (len(nics_of[n]), n))].append(nic)
    usage: Counter = Counter(n.pci or n.name for lst in nics_of.values() for n in lst)
    groups = []
    for i, node in enumerate(nodes):
        mine = nics_of[node]
        if not mine and topo.nics:
            pick = _least_shared(topo.nics, usage)
            usage[pick.pci or pick.name] += 1
            mine = [pick]
        groups.append(Group(index=i, gpu=None, nics=mine, cpus=[], numa_node=node))
    return groups


def _assign_cpus(topo: Topology, groups: list[Group]) -> None:
    every = sorted(c.cpu for c in topo.cores)
    by_pool: dict[int | None, list[Group]] = {}
    for grp in groups:
        key = grp.numa_node if grp.numa_node in topo.cpus and grp.numa_node is not None else None
        by_pool.setdefault(key, []).append(grp)
    for key, members in by_pool.items():
        pool = topo.cpus[key] if key is not None else every
        n, g = len(pool), len(members)
        if n == 0:
            continue
        if n < g:
            for i, grp in enumerate(members):
                grp.cpus[:] = [pool[i % n]]
            continue
        start = 0
        for i, grp in enumerate(members):
            size = n // g + (1 if i < n % g else 0)
            grp.cpus[:] = pool[start:start + size]
            start += size


# ------------------------------------------------------------------ display

def _speed(bps: int | None) -> str:
    if not bps:
        return "?"
    for unit, div in (("Tbit/s", 10**12), ("Gbit/s", 10**9), ("Mbit/s", 10**6)):
        if bps >= div:
            return f"{bps / div:g} {unit}"
    return f"{bps} bit/s"


def format_groups(topo: Topology) -> str:
    """A table of the groups, for ``aiotransfer info``."""
    ncpus = sum(len(c.threads) for c in topo.cores)
    nodes = format_cpulist(topo.numa_nodes) or "unknown"
    lines = [f"topology of {topo.sysfs}: {len(topo.gpus)} GPUs, {len(topo.nics)} NICs, "
             f"NUMA nodes {nodes}, {len(topo.cores)} physical cores ({ncpus} CPUs)"]
    head = f"{'group':<6}{'gpu':<24}{'numa':<6}{'nic':<28}{'pci':<14}{'speed':<13}cpus (1 per core)"
    lines.append(head)
    for grp in topo.groups:
        gpu = f"{grp.gpu.index} {grp.gpu.vendor_name} {grp.gpu.pci}" if grp.gpu else "-"
        numa = "?" if grp.numa_node is None else str(grp.numa_node)
        cpus = format_cpulist(grp.cpus) or "?"
        rows = grp.nics or [None]
        for j, nic in enumerate(rows):
            if nic is None:
                nic_s, pci, speed = "-", "", ""
            else:
                extra = [d for d in nic.netdevs if d != nic.name]
                nic_s = nic.name + (f" ({','.join(extra)})" if extra else "")
                pci, speed = nic.pci or "virtual", _speed(nic.link_speed)
            if j == 0:
                lines.append(f"{grp.index:<6}{gpu:<24}{numa:<6}{nic_s:<28}{pci:<14}{speed:<13}{cpus}")
            else:
                lines.append(f"{'':<36}{nic_s:<28}{pci:<14}{speed}")
    return "\n".join(line.rstrip() for line in lines)
