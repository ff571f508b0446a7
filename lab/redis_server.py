"""The lab's own redis-server: a private port, AOF on, data under the lab dir.

Its users are either one password (`start`, the tests' own Redis) or drover's per-role ACL
users (`start_with_acl`, the lab: config/redis_acl.py). Tests start it through the lab too,
so fault tests can kill and restart a real server.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import redis

from config.redis_acl import HEALTH_USER, write_private
from lab.proc import LabError, kill, spawn, wait_until

REDIS_START_TIMEOUT = 10.0
ACL_FILE = "users.acl"
PRIVATE_DIR_MODE = 0o700
# The health user takes any password (it may only PING); redis-py sends AUTH only with one.
HEALTH_PASSWORD = "health"


def new_password() -> str:
    return secrets.token_hex(16)


def start(data_dir: Path, port: int, bind: list[str], password: str) -> int:
    """Start redis-server (AOF, fsync every second) with one password; wait for PING."""
    conf = write_conf(data_dir, port, bind, [f"requirepass {password}"])
    return run_with(conf, bind[0], port, password)


def start_with_acl(
    data_dir: Path, port: int, bind: list[str], acl: str, extra: list[str] | None = None
) -> int:
    """Start redis-server with the users of `acl` (an ACL file's text); wait for PING.

    The file is written 0600 beside the data: it holds the users' password hashes. `extra`
    lines go into redis.conf as they are (a test's `tls-port`, say).
    """
    acl_path = data_dir / ACL_FILE
    conf = write_conf(data_dir, port, bind, [f"aclfile {acl_path}", *(extra or [])])
    write_private(acl_path, acl)
    return run_with(conf, bind[0], port, HEALTH_PASSWORD, username=HEALTH_USER)


def write_conf(data_dir: Path, port: int, bind: list[str], auth: list[str]) -> Path:
    """redis.conf for the lab: AOF, fsync every second, no RDB snapshots, then the `auth`
    lines (requirepass, or aclfile and whatever else the caller adds)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(PRIVATE_DIR_MODE)
    conf = data_dir / "redis.conf"
    lines = [
        f"port {port}",
        f"bind {' '.join(bind)}",
        "protected-mode yes",
        f"dir {data_dir}",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        *auth,
        f"pidfile {data_dir / 'redis.pid'}",
        "daemonize no",
        "",
    ]
    write_private(conf, "\n".join(lines))
    return conf


def run_with(conf: Path, host: str, port: int, password: str, username: str | None = None) -> int:
    """Start redis-server on an existing config (a restart keeps its AOF); wait for PING."""
    data_dir = conf.parent
    pid = spawn(["redis-server", str(conf)], data_dir / "redis.log")
    client = redis.Redis(
        host=host, port=port, username=username, password=password, socket_timeout=1
    )

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, REDIS_START_TIMEOUT, f"redis-server on port {port}")
    except LabError:
        kill([pid])
        raise LabError(f"redis-server did not start; see {data_dir / 'redis.log'}") from None
    finally:
        client.close()
    return pid
