"""The lab's network: one bridge in the root namespace, one namespace per host joined by veth."""

from __future__ import annotations

from pathlib import Path

from lab.layout import HostLayout, LabLayout
from lab.proc import run

PREFIX_LEN = 24


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def create_bridge(lab: LabLayout) -> None:
    if not _link_exists(lab.bridge):
        run(["ip", "link", "add", lab.bridge, "type", "bridge"])
    run(["ip", "addr", "replace", f"{lab.root_address}/{PREFIX_LEN}", "dev", lab.bridge])
    run(["ip", "link", "set", lab.bridge, "up"])


def create_host_network(lab: LabLayout, host: HostLayout) -> None:
    """A namespace with loopback and one veth into the bridge carrying the host's address."""
    if not netns_exists(host.netns):
        run(["ip", "netns", "add", host.netns])
    if not _link_exists(host.veth_bridge):
        run(["ip", "link", "add", host.veth_bridge, "type", "veth", "peer", "name", host.veth_host])
        run(["ip", "link", "set", host.veth_host, "netns", host.netns])
    run(["ip", "link", "set", host.veth_bridge, "master", lab.bridge])
    run(["ip", "link", "set", host.veth_bridge, "up"])
    ns = ["ip", "-n", host.netns]
    run([*ns, "link", "set", "lo", "up"])
    run([*ns, "addr", "replace", f"{host.address}/{PREFIX_LEN}", "dev", host.veth_host])
    run([*ns, "link", "set", host.veth_host, "up"])


def set_link(host: HostLayout, up: bool) -> None:
    """Cut or restore a host's link to the bridge (fault injection)."""
    run(["ip", "link", "set", host.veth_bridge, "up" if up else "down"])


def lab_namespaces(lab: LabLayout) -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{lab.tag}-")]


def namespace_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split()]


def destroy(lab: LabLayout) -> None:
    """Remove every namespace and link of this lab, whatever state `up` left them in."""
    for ns in lab_namespaces(lab):
        run(["ip", "netns", "del", ns], check=False)
    # The hosts' links and bridge, then the guest network's (lab/guest_net.py): all named
    # from the lab's tag.
    for kind, bridge in (("b", lab.bridge), ("g", lab.guest_bridge)):
        for i in range(1, 65):
            name = f"{lab.tag}{kind}{i}"
            if _link_exists(name):
                run(["ip", "link", "del", name], check=False)
        if _link_exists(bridge):
            run(["ip", "link", "del", bridge], check=False)
