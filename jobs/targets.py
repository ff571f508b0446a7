"""Where a `--migrate-uri` may send a guest's memory: only to its destination, per the registry.

`jobs.spec` checks a migration URI's form; this checks its target. A well-formed
`tcp://attacker.example:4444` or `tcp://169.254.169.254:80` would otherwise have the source
host's QEMU stream the guest's memory (secrets included) to any address the requester names,
and `unix:///etc/shadow` would point QEMU at an arbitrary file on the destination.

So a URI is allowed only toward the destination host's own migration addresses
(`migration_address` and `migration_addresses` in the registry), and a `unix://` one only
under the destination's `migration_socket_dir`. The producer checks it before anything is
written (producer/api.py); the worker checks it again before it migrates, since a job record
read back from Redis is not trusted. Pure: no DNS, no file system, the same answer everywhere.
"""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath

from config.addresses import IPAddress, parse_ip, shown
from config.settings import Host
from jobs.migration_uri import parse_migration_uri


def _canonical(address: str) -> str:
    """One spelling per address: ipaddress's for an IP (an IPv4-mapped IPv6 address as the
    IPv4 address it reaches, a scope id kept), lower case for a DNS name. No resolution: a
    name and an address are never taken for each other."""
    bare = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    ip: IPAddress | None = parse_ip(bare)
    if ip is None:
        return bare.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.scope_id is None:
        return str(ip.ipv4_mapped)
    return str(ip)


def allowed_addresses(dst: Host) -> list[str]:
    """The destination's migration addresses, as the registry spells them."""
    return [dst.migration_address, *dst.migration_addresses]


def _path_problem(path: str, dst: Host) -> str | None:
    """Why unix://PATH may not be used toward `dst`, or None.

    Compared as pure paths after normalisation (`//` and `.` collapsed): a `..` component is
    refused outright rather than resolved, since the real directory behind it could be a
    symlink on the destination.
    """
    if dst.migration_socket_dir is None:
        return (
            f"{dst.name} has no migration_socket_dir in the registry, so no unix:// URI toward "
            f"it (tcp:// or rdma:// to {', '.join(allowed_addresses(dst))} only)"
        )
    socket_dir = PurePosixPath(dst.migration_socket_dir)
    target = PurePosixPath(path)
    if (
        ".." in target.parts
        or ".." in socket_dir.parts
        or target == socket_dir
        or not target.is_relative_to(socket_dir)
    ):
        return f"a unix:// migration URI toward {dst.name} must name a path under {socket_dir}/"
    return None


def migration_uri_problem(uri: str, dst: Host, option: str = "--migrate-uri") -> str | None:
    """Why `uri` may not carry a migration to `dst`, in one line naming what is allowed; or None.

    tcp:// and rdma:// only to one of `dst`'s migration addresses (any port); unix:// only to a
    path strictly under `dst.migration_socket_dir`.
    """
    try:
        parsed = parse_migration_uri(uri)
    except ValueError as exc:
        return str(exc)
    if parsed.path is not None:
        problem = _path_problem(parsed.path, dst)
        return None if problem is None else f"{option} {shown(uri)}: {problem}"
    assert parsed.host is not None
    allowed = allowed_addresses(dst)
    if _canonical(parsed.host) in {_canonical(a) for a in allowed}:
        return None
    return (
        f"{option} {shown(uri)}: {dst.name} receives migrations only at "
        f"{', '.join(allowed)} (its migration addresses in the registry)"
    )
