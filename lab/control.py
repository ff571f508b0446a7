"""`drover lab up|down|status|env`: the local lab of real libvirt hosts, start to finish.

`up` is written so that `down` can always undo it: names are derived from the lab id, and
`down` sweeps by those names as well as by the recorded state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import libvirt

from config.redis_acl import (
    PRODUCER,
    ROLES,
    WORKER,
    BrokerNames,
    render_acl,
    role_url,
    write_private,
)
from config.settings import load_settings
from lab import guests, libvirtd, linux_lab, network, redis_server, shared_storage
from lab import sentinel as redis_sentinel

# Re-exported: the lab's record, workers and fault helpers (lab/state, workers, faults).
from lab.faults import freeze_libvirtd as freeze_libvirtd
from lab.faults import freeze_worker as freeze_worker
from lab.faults import kill_worker as kill_worker
from lab.faults import restart_libvirtd as restart_libvirtd
from lab.faults import restart_redis as restart_redis
from lab.faults import set_link as set_link
from lab.faults import start_libvirtd as start_libvirtd
from lab.faults import start_redis as start_redis
from lab.faults import stop_libvirtd as stop_libvirtd
from lab.faults import stop_redis as stop_redis
from lab.faults import thaw_libvirtd as thaw_libvirtd
from lab.faults import thaw_worker as thaw_worker
from lab.kernel import build_dirty_kernel
from lab.layout import MAX_HOSTS, HostLayout, LabLayout
from lab.metrics import metrics_lines, metrics_url
from lab.prerequisites import check_prerequisites
from lab.proc import LabError, alive, kill, pid_from_file, run
from lab.signing import SigningIdentity, config_lines, create_signing_identity
from lab.state import HostState as HostState
from lab.state import LabState as LabState
from lab.tls import create_ca, issue_host_certificates
from lab.workers import restart_worker as restart_worker
from lab.workers import start_worker

# libvirt prints every error to stderr unless told otherwise; we handle them.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# The lab's directory holds Redis's passwords (state.json, drover.toml) and libvirtd sockets
# that take no authentication: its owner's (root's) alone.
LAB_DIR_MODE = 0o700
MAX_IDLE_GUESTS = 32
# Every lab host reports the same machine's free memory; a declared size per host makes
# placement (and the test of it) depend on the guests placed, not on the page cache.
LAB_HOST_MEMORY_MIB = 1024
# Per host: /var/lib/libvirt is the host's own directory inside its mount namespace.
LAB_STATE_DIR = "/var/lib/libvirt/drover"


def _peer_uri(host: HostLayout, tls: bool) -> str:
    """How workers and peers reach the host's libvirtd: qemu+tls:// in a lab up with --tls."""
    return host.tls_peer_uri if tls else host.peer_uri


def write_config(
    lab: LabLayout,
    hosts: list[HostLayout],
    redis_url: str,
    tls: bool,
    signing: SigningIdentity | None = None,
) -> Path:
    lines = [
        "# Written by `drover lab up`: the registry of this machine's lab hosts.",
        f'redis_url = "{redis_url}"',
        "",
    ]
    # A lab without signing says so: a worker refuses to start unsigned unless told.
    lines += config_lines(signing) if signing is not None else ["[security]", "insecure = true"]
    for h in hosts:
        lines += [
            f"[hosts.{h.name}]",
            'libvirt_uri = "qemu:///system"',
            f'peer_uri = "{_peer_uri(h, tls)}"',
            f'migration_address = "{h.address}"',
            # Inside the host's own mount namespace: each lab host keeps its own records.
            f'state_dir = "{LAB_STATE_DIR}"',
            *metrics_lines(h.address),  # reachable from the root namespace (lab/metrics.py)
            "",
            f"[hosts.{h.name}.limits]",
            f"memory_mib = {LAB_HOST_MEMORY_MIB}",
            "",
        ]
    path = lab.config_path
    write_private(path, "\n".join(lines))  # it holds the producer's Redis password
    return path


def make_lab_dir(lab: LabLayout) -> None:
    """The lab's directory, its owner's alone (even when it existed before)."""
    lab.dir.mkdir(parents=True, exist_ok=True)
    lab.dir.chmod(LAB_DIR_MODE)


def up(
    hosts: int = 2,
    tls: bool = False,
    signing: bool = True,
    guests: int = 1,
    sentinel: bool = False,
    linux_guests: int = 0,
    local_linux_guests: int = 0,
) -> LabState:
    """Bring the lab up; with `tls`, a CA and per-host certificates, libvirtd on TLS too;
    with `sentinel`, Redis is a primary, a replica and three sentinels (lab/sentinel.py).

    With `signing` (default) task messages are signed with the lab's own key; `guests`
    idle guests (idle-1..idle-N) and dirty-1 start on lab1, and the Linux guests
    (lab/linux_lab.py: linux-N on shared storage, linux-local-N on lab1's own disk).
    """
    if not 2 <= hosts <= MAX_HOSTS:
        raise LabError(f"--hosts must be between 2 and {MAX_HOSTS}")
    if not 1 <= guests <= MAX_IDLE_GUESTS:
        raise LabError(f"--guests must be between 1 and {MAX_IDLE_GUESTS}")
    linux_lab.check_counts(linux_guests, local_linux_guests)
    check_prerequisites()
    lab = LabLayout.from_env()
    if LabState.load(lab) is not None or network.lab_namespaces(lab):
        raise LabError(f"a lab is already up (id {lab.lab_id}); run `drover lab down` first")
    make_lab_dir(lab)
    try:
        state = _up(lab, lab.hosts(hosts), tls, signing, guests, sentinel)
        holders = [h.holder_pid for h in state.hosts.values()]
        state.linux_guests = linux_lab.setup(
            lab, lab.hosts(hosts), holders, linux_guests, local_linux_guests
        )
        state.save(lab)
        return state
    except BaseException:
        down()
        raise


def _up(
    lab: LabLayout,
    layouts: list[HostLayout],
    tls: bool,
    signing: bool,
    idle_guests: int,
    sentinel: bool = False,
) -> LabState:
    # One Redis user per role (config/redis_acl.py): drover.toml has the producer's.
    passwords = {role: redis_server.new_password() for role in ROLES}
    plain = f"redis://{lab.root_address}:{lab.redis_port}/0"
    base_url = redis_sentinel.base_url(lab) if sentinel else plain
    urls = {role: role_url(base_url, role, passwords[role]) for role in ROLES}
    identity = create_signing_identity(lab) if signing else None
    config = write_config(lab, layouts, urls[PRODUCER], tls, identity)
    os.environ["DROVER_CONFIG"] = str(config)
    state = LabState(
        lab_id=lab.lab_id, config=str(config), redis_url=urls[PRODUCER], tls=tls, role_urls=urls
    )
    state.save(lab)

    network.create_bridge(lab)
    acl = render_acl(passwords, BrokerNames.from_settings(load_settings(config)))
    if sentinel:
        redis_sentinel.start_set(lab, state, acl, passwords)
    else:
        state.redis_pid = redis_server.start_with_acl(
            lab.redis_dir, lab.redis_port, [lab.root_address, "127.0.0.1"], acl
        )
    state.save(lab)
    kernel = build_dirty_kernel(lab.guests_dir)
    libvirtd.ensure_system_user()
    ca = create_ca(lab) if tls else None
    for h in layouts:
        network.create_host_network(lab, h)
        libvirtd.prepare_dirs(lab, h, tls)
        if ca is not None:
            issue_host_certificates(ca, h)
        hs = HostState(
            name=h.name,
            address=h.address,
            netns=h.netns,
            operator_uri=h.operator_uri,
            peer_uri=_peer_uri(h, tls),
            worker_log=str(h.dir / "worker.log"),
        )
        state.hosts[h.name] = hs
        hs.holder_pid = libvirtd.start_holder(h)
        hs.libvirtd_pid = libvirtd.start_libvirtd(h, hs.holder_pid)
        state.save(lab)
    guests.define_and_start(layouts[0].operator_uri, guests.default_guests(kernel, idle_guests))
    for hs in state.hosts.values():
        start_worker(lab, hs, state.url(WORKER))
        state.save(lab)
    return state


def down() -> list[str]:
    """Stop everything of this lab and remove it; safe to run any number of times."""
    lab = LabLayout.from_env()
    state = LabState.load(lab)
    removed: list[str] = []
    pids: list[int] = []
    for ns in network.lab_namespaces(lab):
        pids += network.namespace_pids(ns)
    if state is not None:
        pids += [p for h in state.hosts.values() for p in (h.worker_pid, h.holder_pid) if p]
    pids += redis_sentinel.leftover_pids(lab, state)
    pids = sorted({p for p in pids if alive(p)})
    if pids:
        kill(pids)
        removed.append(f"{len(pids)} processes")
    if shared_storage.stop(lab):
        removed.append("glusterd")
    redis_pid = state.redis_pid if state else pid_from_file(lab.redis_dir / "redis.pid")
    if redis_pid and alive(redis_pid):
        kill([redis_pid])
        removed.append("redis-server")
    namespaces = network.lab_namespaces(lab)
    network.destroy(lab)
    if namespaces:
        removed.append(f"namespaces {', '.join(namespaces)}")
    if lab.dir.exists():
        shutil.rmtree(lab.dir, ignore_errors=True)
        removed.append(str(lab.dir))
    return removed


def status() -> dict[str, Any]:
    """What is up: per host its operator URI, worker pid and liveness, and its domains."""
    lab = LabLayout.from_env()
    state = LabState.load(lab)
    if state is None:
        return {"up": False, "lab_id": lab.lab_id, "hosts": {}}
    hosts: dict[str, Any] = {}
    for name, h in state.hosts.items():
        hosts[name] = {
            "address": h.address,
            "operator_uri": h.operator_uri,
            "peer_uri": h.peer_uri,
            "worker_pid": h.worker_pid,
            "worker_alive": alive(h.worker_pid),
            "libvirtd_alive": alive(h.libvirtd_pid),
            "metrics_url": metrics_url(h.address),
            "domains": _domains(h.operator_uri),
        }
    return {
        "up": True,
        "lab_id": state.lab_id,
        "config": state.config,
        "tls": state.tls,
        "redis_alive": alive(state.redis_pid),
        "hosts": hosts,
        "linux_guests": linux_lab.status_entries(state.linux_guests),
    }


def _domains(uri: str) -> list[dict[str, Any]]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return []
    try:
        return [
            {"name": d.name(), "active": bool(d.isActive()), "persistent": bool(d.isPersistent())}
            for d in conn.listAllDomains()
        ]
    finally:
        conn.close()


def env_line() -> str:
    lab = LabLayout.from_env()
    if not lab.config_path.exists():
        raise LabError("no lab is up: run `drover lab up` first")
    return f"export DROVER_CONFIG={lab.config_path}"


__all__ = ["LabError", "down", "env_line", "restart_worker", "run", "status", "up"]
