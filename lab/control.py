"""`drover lab up|down|status|env`: the local lab of real libvirt hosts, start to finish.

`up` is written so that `down` can always undo it: names are derived from the lab id, and
`down` sweeps by those names as well as by the recorded state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt
import redis

from config.redis_acl import (
    HEALTH_USER,
    PRODUCER,
    ROLES,
    WORKER,
    BrokerNames,
    render_acl,
    role_url,
    write_private,
)
from config.settings import REDIS_URL_ENV, load_settings
from jobs.store import JobStore, heartbeat_key
from lab import guests, libvirtd, network, redis_server
from lab.kernel import build_dirty_kernel
from lab.layout import MAX_HOSTS, HostLayout, LabLayout
from lab.proc import LabError, alive, kill, run, spawn, wait_until
from lab.signing import SigningIdentity, config_lines, create_signing_identity
from lab.tls import create_ca, issue_host_certificates

# libvirt prints every error to stderr unless told otherwise; we handle them.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

WORKER_START_TIMEOUT = 60.0
# The lab's directory holds Redis's passwords (state.json, drover.toml) and libvirtd sockets
# that take no authentication: its owner's (root's) alone.
LAB_DIR_MODE = 0o700
# The directory holding this code's packages (config, jobs, schedules, worker, producer,
# lab, cli).
SOURCE_ROOT = Path(__file__).resolve().parents[1]
MAX_IDLE_GUESTS = 32
# Every lab host reports the same machine's free memory; a declared size per host makes
# placement (and the test of it) depend on the guests placed, not on the page cache.
LAB_HOST_MEMORY_MIB = 1024
REQUIRED_COMMANDS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "libvirtd": "libvirt-daemon libvirt-daemon-driver-qemu",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "redis-server": "redis-server",
    "as": "binutils",
    "ld": "binutils",
}


@dataclass
class HostState:
    name: str
    address: str
    netns: str
    operator_uri: str
    peer_uri: str
    holder_pid: int = 0
    libvirtd_pid: int = 0
    worker_pid: int = 0
    worker_log: str = ""


@dataclass
class LabState:
    """What `down`, `status` and the fault helpers need; it holds every role's Redis URL
    (with its password), so it is written 0600 in the 0700 lab directory."""

    lab_id: int
    config: str
    redis_url: str  # the producer's, as in drover.toml
    redis_pid: int = 0
    tls: bool = False
    hosts: dict[str, HostState] = field(default_factory=dict)
    # Every role's URL (config/redis_acl.py): workers get theirs in their environment.
    role_urls: dict[str, str] = field(default_factory=dict)

    def save(self, lab: LabLayout) -> None:
        write_private(lab.state_path, json.dumps(asdict(self), indent=2))

    def url(self, role: str) -> str:
        return self.role_urls.get(role, self.redis_url)

    @classmethod
    def load(cls, lab: LabLayout) -> LabState | None:
        try:
            raw = json.loads(lab.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        hosts = {k: HostState(**v) for k, v in raw.pop("hosts").items()}
        return cls(**raw, hosts=hosts)


def check_prerequisites() -> None:
    """Refuse early, with the fix, when not root or a needed program is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, libvirtd): run as root")
    missing = {cmd: pkg for cmd, pkg in REQUIRED_COMMANDS.items() if shutil.which(cmd) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise LabError(
            f"missing {', '.join(sorted(missing))}: run `make deps` "
            f"(or apt-get install --no-install-recommends {pkgs})"
        )


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


def _worker_argv(host: HostState) -> list[str]:
    return [
        *libvirtd.in_host(host.holder_pid),
        sys.executable,
        "-m",
        "cli",
        "worker",
        "--host",
        host.name,
    ]


def worker_env(config: Path, redis_url: str) -> dict[str, str]:
    """A worker's environment: the lab's registry, its own Redis user's URL (which never
    appears on a command line, where `ps` would show it), and this code on the path.

    nsenter's switch to the host's mount namespace moves the working directory to `/`, so
    `python -m cli` would otherwise import whichever drover is installed (an editable
    install of another checkout, say) rather than the code that brought the lab up.
    """
    path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "DROVER_CONFIG": str(config),
        REDIS_URL_ENV: redis_url,
        "PYTHONPATH": path,
    }


def start_worker(lab: LabLayout, host: HostState, redis_url: str) -> None:
    """Start `drover worker --host NAME` inside the host's namespaces, as the worker user;
    wait for its heartbeat.

    Workers obey no remote control (not even ping), so readiness is drover's own heartbeat,
    which the worker starts once it consumes its queue. A heartbeat left by the worker this
    one replaces is removed first.
    """
    store = JobStore.from_url(load_settings(lab.config_path).redis_url)
    store.r.delete(heartbeat_key(host.name))
    log = Path(host.worker_log)
    host.worker_pid = spawn(_worker_argv(host), log, env=worker_env(lab.config_path, redis_url))

    def answers() -> bool:
        if not alive(host.worker_pid):
            raise LabError(f"{host.name}'s worker exited; see {log}")
        try:
            return store.alive(host.name)
        except (redis.RedisError, OSError):
            return False  # a pooled connection from before a Redis restart: try again

    wait_until(answers, WORKER_START_TIMEOUT, f"{host.name}'s worker")


def up(hosts: int = 2, tls: bool = False, signing: bool = True, guests: int = 1) -> LabState:
    """Bring the lab up; with `tls`, a CA and per-host certificates, libvirtd on TLS too.

    With `signing` (the default) every task message is signed with the lab's own key.
    `guests` idle guests (idle-1..idle-N) and dirty-1 start on lab1.
    """
    if not 2 <= hosts <= MAX_HOSTS:
        raise LabError(f"--hosts must be between 2 and {MAX_HOSTS}")
    if not 1 <= guests <= MAX_IDLE_GUESTS:
        raise LabError(f"--guests must be between 1 and {MAX_IDLE_GUESTS}")
    check_prerequisites()
    lab = LabLayout.from_env()
    if LabState.load(lab) is not None or network.lab_namespaces(lab):
        raise LabError(f"a lab is already up (id {lab.lab_id}); run `drover lab down` first")
    make_lab_dir(lab)
    try:
        return _up(lab, lab.hosts(hosts), tls, signing, guests)
    except BaseException:
        down()
        raise


def _up(
    lab: LabLayout, layouts: list[HostLayout], tls: bool, signing: bool, idle_guests: int
) -> LabState:
    # One Redis user per role (config/redis_acl.py): drover.toml has the producer's.
    passwords = {role: redis_server.new_password() for role in ROLES}
    base_url = f"redis://{lab.root_address}:{lab.redis_port}/0"
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
    pids = sorted({p for p in pids if alive(p)})
    if pids:
        kill(pids)
        removed.append(f"{len(pids)} processes")
    redis_pid = state.redis_pid if state else _pid_from_file(lab.redis_dir / "redis.pid")
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


def _pid_from_file(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


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
            "domains": _domains(h.operator_uri),
        }
    return {
        "up": True,
        "lab_id": state.lab_id,
        "config": state.config,
        "tls": state.tls,
        "redis_alive": alive(state.redis_pid),
        "hosts": hosts,
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


def restart_worker(name: str) -> int:
    """Start a host's worker again (after a crash or a kill); return its new pid."""
    lab = LabLayout.from_env()
    state = LabState.load(lab)
    if state is None or name not in state.hosts:
        raise LabError(f"no lab host named {name!r}")
    os.environ["DROVER_CONFIG"] = state.config
    start_worker(lab, state.hosts[name], state.url(WORKER))
    state.save(lab)
    return state.hosts[name].worker_pid


def _loaded() -> tuple[LabLayout, LabState]:
    lab = LabLayout.from_env()
    state = LabState.load(lab)
    if state is None:
        raise LabError("no lab is up: run `drover lab up` first")
    return lab, state


def kill_worker(name: str, sig: int = signal.SIGKILL) -> None:
    """Fault injection: kill a host's worker (kill -9 by default) and wait until it is gone."""
    _, state = _loaded()
    pid = state.hosts[name].worker_pid
    os.kill(pid, sig)
    wait_until(lambda: not alive(pid), WORKER_START_TIMEOUT, f"{name}'s worker to die")


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
    """Start the lab's redis-server again on its config and AOF; return once it answers."""
    lab, state = _loaded()
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


def restart_libvirtd(name: str) -> None:
    """Fault injection: stop a host's libvirtd and start it again (it re-attaches guests)."""
    stop_libvirtd(name)
    start_libvirtd(name)


def set_link(name: str, up: bool) -> None:
    """Fault injection: cut or restore a host's link to the lab bridge."""
    lab, _ = _loaded()
    network.set_link(lab.host(int(name.removeprefix("lab"))), up)


__all__ = ["LabError", "down", "env_line", "restart_worker", "run", "status", "up"]
