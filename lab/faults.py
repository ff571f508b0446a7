"""Fault injection on the lab: kill or freeze a worker, stop Redis or a libvirtd, freeze a
libvirtd, cut a host's link.

Used by the fault suite (tests/faults) and the benchmarks; each helper returns once the fault
(or the recovery from it) can be seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from config.redis_acl import HEALTH_USER
from lab import libvirtd, network, redis_server
from lab.proc import alive, kill, run, wait_until
from lab.sentinel_faults import restart_node
from lab.state import WORKER_START_TIMEOUT
from lab.state import loaded as _loaded

STOPPED = "T"  # /proc/PID/stat's state of a process stopped by a signal
STOP_SEEN_S = 5.0


def kill_worker(name: str, sig: int = signal.SIGKILL) -> None:
    """Fault injection: kill a host's worker (kill -9 by default) and wait until it is gone,
    and until Redis's side of its connections has closed too.

    The dead worker's last BRPOP stays registered in Redis until Redis reads the connection's
    end; on a loaded machine that end may reach Redis after the next push, which Redis then
    hands to the dead worker (the likely cause, not proven, of a fault-suite case that found
    a job's first message, pushed right after the kill, gone from the queue). A case that
    pushes work for the dead host must find it in the queue.
    """
    _, state = _loaded()
    host = state.hosts[name]
    pid = host.worker_pid
    os.kill(pid, sig)
    wait_until(lambda: not alive(pid), WORKER_START_TIMEOUT, f"{name}'s worker to die")
    ports = _redis_ports(state.redis_url, state.node_pids)
    wait_until(
        lambda: not _redis_peers(host.address, ports),
        WORKER_START_TIMEOUT,
        f"Redis to see {name}'s worker gone",
    )


def _redis_ports(url: str, node_ports: dict[str, int]) -> set[int]:
    """The ports the lab's Redis (every node of a Sentinel set) and sentinels listen on."""
    ports = {int(p) for p in node_ports}
    for part in url.split(";"):
        port = urlsplit(part.split("?")[0]).port
        if port is not None:
            ports.add(port)
    return ports


@dataclass(frozen=True)
class Connection:
    """One established TCP connection as `ss` shows it: addresses as ADDRESS:PORT."""

    local: str
    peer: str
    send_q: int

    @property
    def local_port(self) -> int:
        return int(self.local.rsplit(":", 1)[1])


def established(dst: str | None = None) -> list[Connection]:
    """The established TCP connections the root namespace (where Redis runs) sees, those
    with peer `dst` only if given."""
    argv = ["ss", "-Htn", "state", "established", *(["dst", dst] if dst else [])]
    rows = [line.split() for line in run(argv).splitlines()]
    return [Connection(f[2], f[3], int(f[1])) for f in rows if len(f) >= 4]


def _redis_peers(address: str, ports: set[int]) -> list[str]:
    """Established connections from `address` to the lab's Redis ports."""
    return [c.local for c in established(address) if c.local_port in ports]


def restart_redis(sig: int = signal.SIGTERM) -> None:
    """Fault injection: stop the lab's redis-server and start it again on its AOF."""
    stop_redis(sig)
    start_redis()


def stop_redis(sig: int = signal.SIGTERM) -> None:
    """Fault injection: stop the lab's redis-server (SIGTERM writes its AOF out first)."""
    _, state = _loaded()
    if sig == signal.SIGTERM:
        kill([state.redis_pid])
    else:
        os.kill(state.redis_pid, sig)
    wait_until(lambda: not alive(state.redis_pid), WORKER_START_TIMEOUT, "redis-server to stop")


def start_redis() -> None:
    """Start the lab's redis-server again on its config and AOF; return once it answers.

    In a lab up with `--sentinel`, every node that is down comes back as a replica."""
    lab, state = _loaded()
    if state.sentinel_pids:
        for port, pid in state.node_pids.items():
            if not alive(pid):
                restart_node(int(port))
        return
    url = urlsplit(state.redis_url)
    if state.role_urls:  # the lab's ACL users: the health user answers PING
        user, password = HEALTH_USER, redis_server.HEALTH_PASSWORD
    else:
        user, password = None, url.password or ""
    state.redis_pid = redis_server.run_with(
        lab.redis_dir / "redis.conf", "127.0.0.1", int(url.port or 0), password, username=user
    )
    state.save(lab)


def stop_libvirtd(name: str) -> None:
    """Fault injection: stop a host's libvirtd; its guests keep running without it."""
    lab, state = _loaded()
    kill([state.hosts[name].libvirtd_pid])
    layout = lab.host(int(name.removeprefix("lab")))
    (layout.own_dir("/run/libvirt") / "libvirtd.pid").unlink(missing_ok=True)


def start_libvirtd(name: str) -> None:
    lab, state = _loaded()
    host = state.hosts[name]
    layout = lab.host(int(name.removeprefix("lab")))
    host.libvirtd_pid = libvirtd.start_libvirtd(layout, host.holder_pid)
    state.save(lab)


def freeze_libvirtd(name: str) -> None:
    """Fault injection: freeze a host's libvirtd (SIGSTOP), as one stuck on a lock: its
    sockets still accept connections, and nothing answers on them."""
    _, state = _loaded()
    pid = state.hosts[name].libvirtd_pid
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _run_state(pid) == STOPPED, STOP_SEEN_S, f"{name}'s libvirtd to stop")


def freeze_worker(name: str) -> None:
    """Fault injection: freeze a host's worker (SIGSTOP), as a host thrashing in swap or a
    debugger would: its libvirtd, and libvirt's migrations, go on without it."""
    _, state = _loaded()
    pid = state.hosts[name].worker_pid
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _run_state(pid) == STOPPED, STOP_SEEN_S, f"{name}'s worker to stop")


def thaw_worker(name: str) -> None:
    """Let a frozen worker run again (SIGCONT; nothing for one that runs or is gone)."""
    _, state = _loaded()
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.hosts[name].worker_pid, signal.SIGCONT)


def _run_state(pid: int) -> str:
    """A process's state letter (`R`, `S`, `T` for stopped...) as /proc shows it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def thaw_libvirtd(name: str) -> None:
    """Let a frozen libvirtd run again (SIGCONT; nothing for one that runs)."""
    _, state = _loaded()
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.hosts[name].libvirtd_pid, signal.SIGCONT)


def restart_libvirtd(name: str) -> None:
    """Fault injection: stop a host's libvirtd and start it again (it re-attaches guests)."""
    stop_libvirtd(name)
    start_libvirtd(name)


def set_link(name: str, up: bool) -> None:
    """Fault injection: cut or restore a host's link to the lab bridge."""
    lab, _ = _loaded()
    network.set_link(lab.host(int(name.removeprefix("lab"))), up)


def reset_migration_stream(src: str, dst: str) -> int:
    """Fault injection: reset the TCP connections of `src`'s outgoing migration streams to
    `dst` (`ss -K` inside `src`'s namespace); how many it reset.

    Both ends see the stream break at once, as when a router drops the connection: a
    post-copy migration then fails on both hosts (QEMU `postcopy-paused`).
    """
    lab, _ = _loaded()
    source = lab.host(int(src.removeprefix("lab")))
    address = lab.host(int(dst.removeprefix("lab"))).address
    kill_filter = ["dst", address, "dport", "ge", str(libvirtd.MIGRATION_PORT_MIN)]
    out = run(["ip", "netns", "exec", source.netns, "ss", "-K", "-t", "-n", *kill_filter])
    return sum(1 for line in out.splitlines()[1:] if line.strip())
