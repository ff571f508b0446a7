"""`drover lab up --sentinel`: a primary, a replica and three redis-sentinel processes.

ACLs are not replicated, so both nodes load the same ACL file: drover's role users plus two
users of the set itself, the replica's (`masteruser`, to replicate) and the sentinels' (to
watch and reconfigure the nodes), with the commands Redis's documentation lists for each.
Both nodes carry `masteruser`/`masterauth`: either may be the replica after a failover. The
sentinels know drover's role users too (with only what a client asks a sentinel), so the
same `USER:PASSWORD` of a role's URL reaches the master and the sentinels.

The lab's timings are short (a primary is down after 1 s) so a fault test fails over in
seconds; docs/sentinel.md gives a fleet's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import redis

from config.redis_acl import password_rule, user_name, write_private
from config.redis_acl_model import ROLES
from lab import redis_server
from lab.layout import LabLayout
from lab.proc import LabError, spawn, wait_until
from lab.state import WORKER_START_TIMEOUT, LabState

MASTER_NAME = "drover"
REPLICA_USER = "drover-replica"
SENTINEL_USER = "drover-sentinel"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10_000
# What a sentinel needs on a node, and a replica on its master (Redis's ACL documentation).
SENTINEL_NODE_RULES = (
    "allchannels -@all +multi +slaveof +ping +exec +subscribe +config|rewrite +role "
    "+publish +info +client|setname +client|kill +script|kill"
)
REPLICA_NODE_RULES = "resetchannels -@all +psync +replconf +ping"
# What a client (redis-py's Sentinel, kombu's, redbeat's) asks a sentinel: where the master
# is and which sentinels and replicas there are; nothing that reconfigures or fails over.
CLIENT_SENTINEL_RULES = (
    "resetchannels -@all +ping +auth +hello +client|setname "
    "+sentinel|get-master-addr-by-name +sentinel|masters +sentinel|master "
    "+sentinel|sentinels +sentinel|slaves +sentinel|replicas"
)


def node_acl(acl: str, set_passwords: Mapping[str, str]) -> str:
    """The nodes' ACL file: drover's (`acl`) plus the replica's and the sentinels' users."""
    lines = [
        f"user {REPLICA_USER} on {password_rule(set_passwords[REPLICA_USER])} {REPLICA_NODE_RULES}",
        f"user {SENTINEL_USER} on {password_rule(set_passwords[SENTINEL_USER])} "
        f"{SENTINEL_NODE_RULES}",
    ]
    return acl + "\n".join(lines) + "\n"


def node_extra(lab: LabLayout, replica_password: str, primary: int | None) -> list[str]:
    """redis.conf lines of a node: how it authenticates as a replica, the address it gives
    (the lab bridge's, reachable from every host), and `replicaof` for the replica."""
    lines = [
        f"masteruser {REPLICA_USER}",
        f"masterauth {replica_password}",
        f"replica-announce-ip {lab.root_address}",
    ]
    if primary is not None:
        lines.append(f"replicaof {lab.root_address} {primary}")
    return lines


def sentinel_conf(lab: LabLayout, port: int, passwords: Mapping[str, str]) -> list[str]:
    """sentinel.conf: monitor the primary, authenticate to nodes and to the other sentinels
    as the sentinels' user; drover's role users may only ask where the master is."""
    own = passwords[SENTINEL_USER]
    directory = lab.sentinel_dir(port - lab.sentinel_ports[0])
    users = ["user default off resetpass resetkeys -@all"]
    users.append(f"user {SENTINEL_USER} on {password_rule(own)} allchannels ~* +@all")
    for role in ROLES:
        users.append(
            f"user {user_name(role)} on {password_rule(passwords[role])} {CLIENT_SENTINEL_RULES}"
        )
    return [
        f"port {port}",
        f"bind {lab.root_address} 127.0.0.1",
        "protected-mode no",
        "daemonize no",
        f"dir {directory}",
        f"pidfile {directory / 'sentinel.pid'}",
        f"sentinel announce-ip {lab.root_address}",
        *users,
        f"sentinel sentinel-user {SENTINEL_USER}",
        f"sentinel sentinel-pass {own}",
        f"sentinel monitor {MASTER_NAME} {lab.root_address} {lab.redis_port} {QUORUM}",
        f"sentinel auth-user {MASTER_NAME} {SENTINEL_USER}",
        f"sentinel auth-pass {MASTER_NAME} {own}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
        "",
    ]


def base_url(lab: LabLayout) -> str:
    """The lab's Sentinel set as a `redis_url` without credentials (config/redis_sentinel.py)."""
    parts = [f"sentinel://{lab.root_address}:{port}" for port in lab.sentinel_ports]
    return ";".join(parts) + f"/0?master_name={MASTER_NAME}"


def start_replica(lab: LabLayout, acl: str, replica_password: str) -> int:
    """The replica, on its own port and directory, following the primary."""
    extra = node_extra(lab, replica_password, primary=lab.redis_port)
    return redis_server.start_with_acl(
        lab.replica_dir, lab.replica_port, [lab.root_address, "127.0.0.1"], acl, extra
    )


def start_sentinels(lab: LabLayout, passwords: Mapping[str, str]) -> list[int]:
    """Three redis-sentinel processes; return once each sees the replica in sync and the
    other two (before that, a failover could not happen)."""
    pids = []
    for index, port in enumerate(lab.sentinel_ports):
        directory = lab.sentinel_dir(index)
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(redis_server.PRIVATE_DIR_MODE)
        conf = directory / "sentinel.conf"
        write_private(conf, "\n".join(sentinel_conf(lab, port, passwords)))
        pids.append(spawn(["redis-sentinel", str(conf)], directory / "sentinel.log"))
    for port in lab.sentinel_ports:
        wait_until(
            lambda port=port: _sees_replica(port, passwords[SENTINEL_USER]),  # type: ignore[misc]
            WORKER_START_TIMEOUT,
            f"redis-sentinel on port {port} to see the master and its replica",
        )
    return pids


def ask_sentinel(port: int, password: str) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        username=SENTINEL_USER,
        password=password,
        socket_timeout=1,
        decode_responses=True,
    )


def _replicas(client: redis.Redis) -> list[dict[str, str]]:
    """SENTINEL REPLICAS as dicts, read raw: redis-py 6.4's parsers of the SENTINEL
    replies fail when called on a plain client (an unexpected keyword argument)."""
    rows: list[list[str]] = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)  # type: ignore[no-untyped-call]
    return [dict(zip(row[::2], row[1::2], strict=True)) for row in rows]


def _sees_replica(port: int, password: str) -> bool:
    """The sentinel sees the replica in sync and the other sentinels: it can fail over."""
    try:
        with ask_sentinel(port, password) as client:
            replicas = _replicas(client)
            others = len(client.execute_command("SENTINEL", "SENTINELS", MASTER_NAME))
    except redis.RedisError:
        return False
    synced = [r for r in replicas if r.get("master-link-status") == "ok"]
    return bool(synced) and others == len(LabLayout.from_env().sentinel_ports) - 1


def master_port(state: LabState) -> int | None:
    """The port of the node the sentinels call master now (None if none answers)."""
    for port in LabLayout.from_env().sentinel_ports:
        try:
            with ask_sentinel(port, state.sentinel_password) as client:
                found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        except redis.RedisError:
            continue
        if found:
            return int(found[1])
    return None


def settled_master(state: LabState) -> int | None:
    """The master's port once every sentinel names the same one and none is failing it over;
    None before. A failover named by one sentinel can still abort on a loaded machine (its
    promotion outlasting `failover-timeout`), and the old master is named again."""
    named = set()
    for port in LabLayout.from_env().sentinel_ports:
        try:
            with ask_sentinel(port, state.sentinel_password) as client:
                row = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
        except redis.RedisError:
            return None
        master = dict(zip(row[::2], row[1::2], strict=True))
        if "failover_in_progress" in master.get("flags", "").split(","):
            return None
        named.add(int(master["port"]))
    return named.pop() if len(named) == 1 else None


def replica_in_sync(state: LabState, port: int) -> bool:
    """Every sentinel sees the node on `port` as a replica whose link to the master is up."""
    for sentinel_port in LabLayout.from_env().sentinel_ports:
        try:
            with ask_sentinel(sentinel_port, state.sentinel_password) as client:
                replicas = _replicas(client)
        except redis.RedisError:
            return False
        if not any(
            int(r["port"]) == port
            and r.get("master-link-status") == "ok"
            and not {"s_down", "disconnected"} & set(r.get("flags", "").split(","))
            for r in replicas
        ):
            return False
    return True


def replica_views(state: LabState, port: int) -> str:
    """What each sentinel says of the node on `port`, in one line: why it is not (yet) seen
    in sync, when a wait for it times out."""
    views = []
    for sentinel_port in LabLayout.from_env().sentinel_ports:
        try:
            with ask_sentinel(sentinel_port, state.sentinel_password) as client:
                rows = [r for r in _replicas(client) if int(r["port"]) == port]
        except redis.RedisError as exc:
            views.append(f"sentinel {sentinel_port}: {exc}")
            continue
        said = [f"{r.get('flags')} link {r.get('master-link-status')}" for r in rows]
        views.append(f"sentinel {sentinel_port}: {said or 'not listed'}")
    return "; ".join(views)


def node_dir(lab: LabLayout, port: int) -> Path:
    if port == lab.redis_port:
        return lab.redis_dir
    if port == lab.replica_port:
        return lab.replica_dir
    raise LabError(f"no lab Redis node on port {port}")


def start_set(lab: LabLayout, state: LabState, acl: str, passwords: Mapping[str, str]) -> None:
    """The primary, its replica and the sentinels, recorded in `state` as each starts.

    `passwords` are the role users'; the set's own users get fresh ones here."""
    own = {REPLICA_USER: redis_server.new_password(), SENTINEL_USER: redis_server.new_password()}
    state.sentinel_password = own[SENTINEL_USER]
    acl = node_acl(acl, own)
    bind = [lab.root_address, "127.0.0.1"]
    extra = node_extra(lab, own[REPLICA_USER], primary=None)
    state.redis_pid = redis_server.start_with_acl(lab.redis_dir, lab.redis_port, bind, acl, extra)
    state.node_pids[str(lab.redis_port)] = state.redis_pid
    state.save(lab)
    state.node_pids[str(lab.replica_port)] = start_replica(lab, acl, own[REPLICA_USER])
    state.save(lab)
    state.sentinel_pids = start_sentinels(lab, {**passwords, **own})
    state.save(lab)


def leftover_pids(lab: LabLayout, state: LabState | None) -> list[int]:
    """Every process of the set, from the state or (after a failed `up`) the pid files."""
    pids = list(state.node_pids.values()) + state.sentinel_pids if state else []
    files = [lab.replica_dir / "redis.pid"]
    files += [lab.sentinel_dir(i) / "sentinel.pid" for i in range(len(lab.sentinel_ports))]
    for path in files:
        try:
            pids.append(int(path.read_text().strip()))
        except (FileNotFoundError, ValueError):
            continue
    return pids
