"""The lab's workers: one `drover worker --host NAME` per host, inside its namespaces."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import redis

from config.redis_acl import WORKER
from config.settings import REDIS_URL_ENV, load_settings
from jobs.keys import host_facts_key
from jobs.store import JobStore, heartbeat_key
from lab import libvirtd
from lab.layout import LabLayout
from lab.proc import LabError, alive, spawn, wait_until
from lab.state import WORKER_START_TIMEOUT, HostState, LabState

# The directory holding this code's packages (config, jobs, schedules, worker, producer,
# lab, cli).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def worker_argv(host: HostState) -> list[str]:
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
    which the worker starts once it consumes its queue, and its first host facts (what an
    evacuation plans from, jobs/host_facts.py). What the worker this one replaces left of
    either is removed first.
    """
    store = JobStore.from_url(load_settings(lab.config_path).redis_url)
    store.r.delete(heartbeat_key(host.name), host_facts_key(host.name))
    log = Path(host.worker_log)
    host.worker_pid = spawn(worker_argv(host), log, env=worker_env(lab.config_path, redis_url))

    def answers() -> bool:
        if not alive(host.worker_pid):
            raise LabError(f"{host.name}'s worker exited; see {log}")
        try:
            return store.alive(host.name) and bool(store.r.exists(host_facts_key(host.name)))
        except (redis.RedisError, OSError):
            return False  # a pooled connection from before a Redis restart: try again

    wait_until(answers, WORKER_START_TIMEOUT, f"{host.name}'s worker")


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
