"""Fault injection on a lab up with `--sentinel`: kill the primary, bring a node back.

Each helper returns once what it did can be seen: the sentinels name a new master, or the
node is back as a replica in sync with it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from config.redis_acl import HEALTH_USER, write_private
from lab import redis_server
from lab.proc import LabError, alive, wait_until
from lab.sentinel import master_port, node_dir, replica_in_sync, replica_views, settled_master
from lab.state import WORKER_START_TIMEOUT, LabState
from lab.state import loaded as _loaded

# A node brought back resyncs in full from the new master, and the sentinels notice its
# link is up on their next INFO look (every 10 s): on a loaded 2-core machine, tens of seconds.
SYNC_TIMEOUT_S = 2 * WORKER_START_TIMEOUT


def kill_primary(sig: int = signal.SIGKILL) -> int:
    """Fault injection: kill the node the sentinels call master (kill -9 by default) and
    wait until they all name the replica master with the failover over; the port of the node
    killed."""
    lab, state = _loaded()
    if not state.sentinel_pids:
        raise LabError("the lab has no sentinels: `drover lab up --sentinel`")
    port = master_port(state)
    if port is None:
        raise LabError("no sentinel names a master")
    pid = state.node_pids[str(port)]
    os.kill(pid, sig)
    wait_until(lambda: not alive(pid), WORKER_START_TIMEOUT, "the Redis primary to die")

    master = _agreed_master(state, WORKER_START_TIMEOUT, other_than=port)
    state.redis_pid = state.node_pids[str(master)]  # `status` follows the master
    state.save(lab)
    return port


def _agreed_master(state: LabState, timeout: float, other_than: int | None = None) -> int:
    """Wait until every sentinel names one master (not `other_than`) with no failover under
    way; its port."""
    seen: list[int] = []

    def agreed() -> bool:
        master = settled_master(state)
        if master is None or master == other_than:
            return False
        seen.append(master)
        return True

    wait_until(agreed, timeout, "the sentinels to agree on a master")
    return seen[-1]


def _follow(conf: Path, address: str, master: int) -> None:
    """Make the node of `conf` start as `master`'s replica, as an operator brings back an old
    primary: left to the sentinels, it starts as a second primary until they notice it and
    turn it (tens of seconds on a busy machine), taking writes nobody will keep."""
    kept = [
        line
        for line in conf.read_text().splitlines()
        if not line.startswith(("replicaof ", "slaveof "))
    ]
    write_private(conf, "\n".join([*kept, f"replicaof {address} {master}", ""]))


def restart_node(port: int) -> None:
    """Start a node again on its config and AOF as the master's replica; return once the
    sentinels see it in sync."""
    lab, state = _loaded()
    conf = node_dir(lab, port) / "redis.conf"
    master = _agreed_master(state, SYNC_TIMEOUT_S)
    if master != port:
        _follow(conf, lab.root_address, master)
    pid = redis_server.run_with(
        conf, "127.0.0.1", port, redis_server.HEALTH_PASSWORD, username=HEALTH_USER
    )
    state.node_pids[str(port)] = pid
    if port == lab.redis_port:
        state.redis_pid = pid
    state.save(lab)
    try:
        wait_until(lambda: replica_in_sync(state, port), SYNC_TIMEOUT_S, f"Redis on {port}")
    except LabError as exc:
        raise LabError(f"{exc} to follow: {replica_views(state, port)}") from None
