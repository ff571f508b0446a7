"""The synthetic fleet bench/scale.py runs against: a private Redis and a 200-host registry.

Nothing here is a hypervisor. The registry names hosts whose addresses are documentation
ranges (no worker and no libvirtd behind them); the Redis is a real `redis-server` started
on a private port with AOF on, as the test suite starts its own, and stopped at the end.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from lab.proc import kill
from lab.redis_server import new_password, start

HOSTS = 200
ADDRESS_BLOCK = "10.77"  # 10.77.<i // 250>.<i % 250 + 1>: one address per synthetic host
HOSTS_PER_OCTET = 250
CLUSTER_LIMIT = 64  # migrations in flight fleet-wide, as a fleet of 200 might allow


def host_name(i: int) -> str:
    return f"h{i:03d}"


def _address(i: int) -> str:
    return f"{ADDRESS_BLOCK}.{i // HOSTS_PER_OCTET}.{i % HOSTS_PER_OCTET + 1}"


def registry_toml(redis_url: str, hosts: int, state_root: Path) -> str:
    """A registry of `hosts` hosts with drover's default per-host limits (2 out, 2 in)."""
    lines = [f'redis_url = "{redis_url}"', "", "[cluster]", f"max_migrations = {CLUSTER_LIMIT}"]
    for i in range(hosts):
        lines += [
            "",
            f"[hosts.{host_name(i)}]",
            f'peer_uri = "qemu+tcp://{_address(i)}/system"',
            f'migration_address = "{_address(i)}"',
            f'state_dir = "{state_root / host_name(i)}"',
        ]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Fleet:
    config: Path  # the registry file ($DROVER_CONFIG for a `drover` subprocess)
    redis_url: str
    client: redis.Redis

    def used_memory(self) -> int:
        info: dict[str, Any] = self.client.info("memory")  # type: ignore[assignment]
        return int(info["used_memory"])


@contextmanager
def fleet(hosts: int = HOSTS) -> Iterator[Fleet]:
    """A private redis-server and a registry file of `hosts` hosts; both gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="drover-scale-") as tmp:
        root = Path(tmp)
        port, password = _free_port(), new_password()
        pid = start(root / "redis", port, ["127.0.0.1"], password)
        try:
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            config = root / "drover.toml"
            config.write_text(registry_toml(url, hosts, root / "state"))
            os.chmod(config, 0o600)
            client = redis.Redis.from_url(url, decode_responses=True)
            yield Fleet(config, url, client)
        finally:
            kill([pid])
