"""A registry of two hosts that do not exist: for tests that must never reach a hypervisor."""

from __future__ import annotations

import re
from pathlib import Path

_HOST_HEADER = re.compile(r"^\[hosts\.(?P<host>[A-Za-z0-9_-]+)\]$")

REGISTRY = """
redis_url = "{url}"

[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"

[hosts.kvm2]
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
"""


def hosts_toml(count: int) -> str:
    """`[hosts.kvm1]` .. `[hosts.kvmN]`: hosts that do not exist (TEST-NET-1 addresses)."""
    return "".join(
        f'[hosts.kvm{n}]\npeer_uri = "qemu+tcp://192.0.2.{n}/system"\n'
        f'migration_address = "192.0.2.{n}"\n'
        for n in range(1, count + 1)
    )


def with_state_dirs(registry: str, root: Path) -> str:
    """`registry` with each host's `state_dir` (its ledger) under `root`, not /var/lib/drover:
    a worker started by a test then runs as any user."""
    lines = []
    for line in registry.splitlines():
        lines.append(line)
        header = _HOST_HEADER.match(line)
        if header:
            lines.append(f'state_dir = "{root / header["host"]}"')
    return "\n".join(lines) + "\n"


def signing_section(keys: Path) -> str:
    """The `[security]` table of a fleet with signing on, its key and certificate in `keys`
    (key.pem, cert.pem) and the certificates it trusts in `keys/trusted`."""
    return f"""
[security]
signing = true
key = "{keys / "key.pem"}"
certificate = "{keys / "cert.pem"}"
cert_store = "{keys / "trusted"}"
"""


def make_fleet_keys(keys: Path) -> Path:
    """The producer's key and certificate in `keys` and a store trusting it, laid out as
    `signing_section` names them; `keys` back."""
    from lab.signing import make_certificate  # RSA, made only by the tests that sign

    (keys / "trusted").mkdir(parents=True)
    make_certificate(keys / "key.pem", keys / "cert.pem", "/CN=producer")
    (keys / "trusted" / "producer.pem").write_bytes((keys / "cert.pem").read_bytes())
    return keys
