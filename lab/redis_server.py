"""The lab's own redis-server: a private port, AOF on, a password, data under the lab dir.

Tests start it through the lab too, so fault tests can kill and restart a real server.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import redis

from lab.proc import LabError, kill, spawn, wait_until

REDIS_START_TIMEOUT = 10.0


def new_password() -> str:
    return secrets.token_hex(16)


def start(data_dir: Path, port: int, bind: list[str], password: str) -> int:
    """Start redis-server (AOF, fsync every second) and wait until it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {port}",
                f"bind {' '.join(bind)}",
                "protected-mode yes",
                f"dir {data_dir}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                f"requirepass {password}",
                f"pidfile {data_dir / 'redis.pid'}",
                "daemonize no",
                "",
            ]
        )
    )
    conf.chmod(0o600)
    return run_with(conf, bind[0], port, password)


def run_with(conf: Path, host: str, port: int, password: str) -> int:
    """Start redis-server on an existing config (a restart keeps its AOF); wait for PING."""
    data_dir = conf.parent
    pid = spawn(["redis-server", str(conf)], data_dir / "redis.log")
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=1)

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
    return pid
