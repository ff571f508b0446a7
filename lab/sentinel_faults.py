"""Fault injection on a lab up with `--sentinel`: kill the primary, bring a node back.

Each helper returns once what it did can be seen: the sentinels name a new master, or the
node is back as a replica in sync with it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import cast

import redis

from config.redis_acl import HEALTH_USER, write_private
from lab import redis_server
from lab.layout import LabLayout
from lab.proc import LabError, alive, wait_until
from lab.sentinel import (
    MASTER_NAME,
    SENTINEL_USER,
    ask_sentinel,
    master_port,
    node_dir,
    replica_in_sync,
    replica_views,
    settled_master,
)
from lab.state import WORKER_START_TIMEOUT, LabState
from lab.state import loaded as _loaded

# A node brought back resyncs in full from the new master, and the sentinels notice its
# link is up on their next INFO look (every 10 s): on a loaded 2-core machine, tens of seconds.
SYNC_TIMEOUT_S = 2 * WORKER_START_TIMEOUT
# How long a node that says it follows the master may go unlisted by the sentinels (three of
# their 10 s INFO looks) before they are reset to read the master's replicas again.
NUDGE_AFTER_S = 30.0


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
    nudge = _Nudge(state, port)
    try:
        wait_until(nudge.in_sync, SYNC_TIMEOUT_S, f"Redis on {port}")
    except LabError as exc:
        views = f"{replica_views(state, port)}; {node_view(state, port)}"
        raise LabError(f"{exc} to follow: {views}") from None


class _Nudge:
    """Whether the node is seen in sync; once the node itself has said for NUDGE_AFTER_S
    that it follows the master while the sentinels do not see it so, they are reset once to
    read the master's replicas again. A make test run once saw all three sentinels leave a
    node brought back unlisted for the whole wait (its own view was not kept then: a wait
    that times out now prints it too)."""

    def __init__(self, state: LabState, port: int) -> None:
        self.state, self.port = state, port
        self.linked_since: float | None = None
        self.nudged = False

    def in_sync(self) -> bool:
        if replica_in_sync(self.state, self.port):
            return True
        if self.nudged or not node_linked(self.state, self.port):
            self.linked_since = None
            return False
        now = time.monotonic()
        if self.linked_since is None:
            self.linked_since = now
        elif now - self.linked_since >= NUDGE_AFTER_S:
            rediscover(self.state)
            self.nudged = True
        return False


def node_view(state: LabState, port: int) -> str:
    """What the node on `port` says of its own replication, in one line (its INFO as the
    sentinels' user, which may read it): beside the sentinels' views when a wait times out."""
    try:
        info = _replication(state, port)
    except redis.RedisError as exc:
        return f"node {port}: {exc}"
    return (
        f"node {port}: role {info.get('role')}, master port {info.get('master_port')}, "
        f"link {info.get('master_link_status')}"
    )


def node_linked(state: LabState, port: int) -> bool:
    """The node on `port` says it is a replica with its link to the master up."""
    try:
        info = _replication(state, port)
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


def rediscover(state: LabState) -> None:
    """SENTINEL RESET on every sentinel: each forgets the master's replicas and sentinels and
    reads them again from the master's INFO and the hello channel (within seconds)."""
    for sentinel_port in LabLayout.from_env().sentinel_ports:
        try:
            with ask_sentinel(sentinel_port, state.sentinel_password) as client:
                client.execute_command("SENTINEL", "RESET", MASTER_NAME)
        except redis.RedisError:
            continue  # a sentinel that does not answer keeps its view; the wait says so


def _replication(state: LabState, port: int) -> dict[str, object]:
    """The node's INFO replication, read as the sentinels' user (which may read it)."""
    node = redis.Redis(
        host="127.0.0.1",
        port=port,
        username=SENTINEL_USER,
        password=state.sentinel_password,
        socket_timeout=1,
        decode_responses=True,
    )
    with node:
        return cast(dict[str, object], node.info("replication"))
