"""The ``aiotransfer`` console script: ``info``, ``demo`` and ``bench``."""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys

from . import TransferEngine, TransferError, __version__, _core, topology
from .engine import sysfs_link_speed


def _speed(bps: int | None) -> str:
    if not bps:
        return "unknown"
    for unit, div in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6)):
        if bps >= div:
            return f"{bps / div:g} {unit}"
    return f"{bps} bit/s"


async def _probe(provider: str, nic: str | None) -> dict | None:
    try:
        async with TransferEngine(provider, nics=[nic] if nic else None) as eng:
            return eng.nics[0].details
    except TransferError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    rows = _core.fabric_info(args.provider)
    print(f"aiotransfer {__version__}: libfabric providers and NICs (domains) with RDM + RMA")
    seen = set()
    print(f"{'provider':<16} {'nic':<10} {'fabric':<20} {'link speed':<12} usable")
    for prov, dom, fab, speed, ipv4 in rows:
        if prov.startswith(("net", "ofi_")) and not args.all:
            continue
        key = (prov, dom, fab)
        if key in seen:
            continue
        seen.add(key)
        usable = ""
        if speed is None:
            speed = sysfs_link_speed(dom)
        if ipv4 or prov == "shm":
            det = asyncio.run(_probe(prov, None if prov == "shm" else dom))
            if det is None:
                usable = "no (engine failed to open)"
            else:
                flags = [f"wait-fd={'yes' if det['wait_fd'] else 'no'}",
                         f"addr={'virtual' if det['virt_addr'] else 'offset'}",
                         f"max-msg={det['max_msg_size'] if det['max_msg_size'] < 2**62 else 'inf'}",
                         f"tx-depth={det['tx_size']}"]
                usable = "yes " + " ".join(flags)
        print(f"{prov:<16} {dom:<10} {fab:<20} {_speed(speed):<12} {usable}")
    if shutil.which("ibv_devices"):
        out = subprocess.run(["ibv_devices"], capture_output=True, text=True).stdout
        devs = [ln.split()[0] for ln in out.splitlines()[2:] if ln.strip()]
        print(f"verbs devices: {', '.join(devs) if devs else 'none'}")
    print()
    print(topology.format_groups(topology.detect(args.sysfs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiotransfer")
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="list providers and NICs libfabric offers here")
    p.add_argument("--provider", default=None, help="only this libfabric provider")
    p.add_argument("--all", action="store_true", help="include utility/experimental providers")
    p.add_argument("--sysfs", default="/sys", metavar="PATH",
                   help="read the GPU/NIC/CPU topology from this sysfs tree (default: %(default)s)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="run the two-process paged-write demo")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("aiotransfer.demo", fromlist=["main"]).main(a.rest))
    # bench: listed here, parsed by aiotransfer.bench.sweep (its options start with "-")
    sub.add_parser("bench", add_help=False,
                   help="benchmark sweep against raw C libfabric and peer libraries "
                        "(aiotransfer bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench.sweep import main as bench_main
        return bench_main(argv[1:])
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
