"""Addresses a value may name a host by: an IP address or a DNS name, checked strictly.

Used by the registry (config/settings.py, config/uris.py) and by a migration's own addresses
(jobs/spec.py, jobs/migration_uri.py): kept at the bottom layer so that config needs nothing
from jobs.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TypeAlias

MAX_PORT = 65535
# An IPv6 scope id names an interface: Linux's IFNAMSIZ is 16 bytes with the NUL.
MAX_INTERFACE_NAME = 15
# Longest excerpt of a refused value quoted back in an error (the value may be megabytes).
MAX_SHOWN_CHARS = 80
# Python's `$` also matches before a trailing newline, so these patterns end in \Z instead;
# re.ASCII (or explicit [0-9] classes) because `\d` and `\w` match any Unicode digit or letter.
_DNS_NAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*\Z",
    re.ASCII,
)
# A label the C library's inet_aton reads as a number in hex (0x0a): with an all-digit last
# label (RFC 3696 section 2: a top-level label is never all-numeric), what makes a name
# numeric-looking. Such a name that is no canonical IPv4 address would be resolved to another
# address (010.0.0.1 is 8.0.0.1, 167772162 is 10.0.0.2) instead of being looked up.
_HEX_LABEL = re.compile(r"^0[xX][0-9A-Fa-f]*\Z", re.ASCII)
_SCOPE_ID = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_INTERFACE_NAME}}}\Z", re.ASCII)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def shown(value: str) -> str:
    """`value` quoted for an error message, cut short: one readable line whatever came in."""
    if len(value) <= MAX_SHOWN_CHARS:
        return repr(value)
    return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"


def parse_ip(text: str) -> IPAddress | None:
    """`text` as an IP address, or None; an IPv6 scope id only as a plain interface name.

    `ipaddress` alone is too lenient for values that end up in QEMU and libvirt arguments:
    it takes anything after an IPv6 `%` (spaces, quotes, thousands of characters).
    """
    if not text.isascii():
        return None
    address, percent, scope = text.partition("%")
    try:
        if percent:
            if not _SCOPE_ID.match(scope):
                return None
            return ipaddress.IPv6Address(text)
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _scope_problem(text: str) -> str | None:
    """Why an IPv6 address with a scope id is refused, when the scope id is the reason."""
    address, percent, scope = text.partition("%")
    if percent and parse_ip(address) is not None and not _SCOPE_ID.match(scope):
        return (
            f"IPv6 scope id {shown(scope)} must be an interface name "
            f"([A-Za-z0-9_.-], at most {MAX_INTERFACE_NAME} characters)"
        )
    return None


def check_address(value: str) -> str:
    """An IP address or a DNS name: nothing that could carry a URI part or an option.

    Brackets hold an IPv6 address only (`[10.0.0.1]` is no form QEMU or libvirt agree on);
    ASCII only, so no look-alike digits or letters pass as an address. A name that looks
    numeric (an all-digit last label, a hex label) must be a canonical IPv4 address, which
    ipaddress alone accepts: 010.213.18.2, 0x0a.0xd5.18.2, 181473794, 1.2.3, 999.1.1.1 are
    refused, as the resolver would turn each into some other address.
    """
    if value.startswith("[") or value.endswith("]"):
        inner = value[1:-1] if value.startswith("[") and value.endswith("]") else ""
        ip = parse_ip(inner)
        if ip is None or ip.version != 6:
            problem = _scope_problem(inner)
            raise ValueError(problem or f"brackets hold an IPv6 address only, not {shown(value)}")
        return value
    if parse_ip(value) is not None:
        return value
    problem = _scope_problem(value)
    if problem:
        raise ValueError(problem)
    if not _DNS_NAME.match(value):
        raise ValueError(f"not an IP address or host name: {shown(value)}")
    labels = value.split(".")
    if labels[-1].isdigit() or any(_HEX_LABEL.match(label) for label in labels):
        raise ValueError(
            f"{shown(value)} is written like a number (an all-digit last label or a 0x label) "
            "but is no IPv4 address in canonical form (four decimal numbers 0-255, no leading "
            "zeros): a resolver may read it as another address"
        )
    return value
