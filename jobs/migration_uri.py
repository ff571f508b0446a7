"""A migration URI of the strict form drover accepts: tcp://HOST[:PORT], rdma://HOST[:PORT]
or unix:///PATH (its target is checked against the registry in jobs/targets.py)."""

from __future__ import annotations

import re
from typing import NamedTuple

from config.addresses import MAX_PORT, check_address, shown

MIGRATION_URI_SCHEMES = ("tcp", "rdma", "unix")
_NET_URI = re.compile(r"^(tcp|rdma)://(\[[^\[\]/?#@]*\]|[^/:?#@\[\]]+)(:([0-9]{1,5}))?/?\Z")
_UNIX_URI = re.compile(r"^unix://(/[A-Za-z0-9._/-]{1,200})\Z", re.ASCII)


class MigrationURI(NamedTuple):
    """The parts of a checked migration URI: `host` for tcp/rdma, `path` for unix."""

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_migration_uri(value: str) -> MigrationURI:
    """tcp://HOST[:PORT], rdma://HOST[:PORT] or unix:///PATH; no user, query or fragment.

    HOST is returned as written (brackets stripped from an IPv6 address); ValueError, one
    line, for anything else.
    """
    net = _NET_URI.match(value)
    if net:
        host = net.group(2)
        try:
            check_address(host)
        except ValueError as exc:
            raise ValueError(f"migration URI {shown(value)}: {exc}") from None
        port = net.group(4)
        if port is not None and not 1 <= int(port) <= MAX_PORT:
            raise ValueError(f"port out of range in migration URI {shown(value)}")
        bare = host[1:-1] if host.startswith("[") else host
        return MigrationURI(net.group(1), host=bare, port=int(port) if port else None)
    unix = _UNIX_URI.match(value)
    if unix and ".." not in unix.group(1).split("/"):
        return MigrationURI("unix", path=unix.group(1))
    raise ValueError(
        f"migration URI {shown(value)} must be tcp://HOST[:PORT], rdma://HOST[:PORT] or "
        "unix:///PATH (no user, query or fragment)"
    )


def check_migration_uri(value: str) -> str:
    """`value` if it is a migration URI of the strict form (parse_migration_uri)."""
    parse_migration_uri(value)
    return value
