"""A Host-header allowlist in front of Flower's handlers (a Tornado routing rule).

Why: a page on any web site can make the operator's browser send requests to
http://127.0.0.1:5555, and with DNS rebinding read the answers, as long as the server answers
whatever Host the request names. Flower does not look at Host. The rule below is matched
before every Flower handler (static files included) and answers 403 to a request whose Host
is not one of the names Flower is meant to be reached by, so the handler never runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from tornado.httputil import HTTPServerRequest
from tornado.routing import Matcher, Rule
from tornado.web import RequestHandler

HTTP_FORBIDDEN = 403
# Reached on the machine itself: always allowed.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name in a Host header: lower case, without port or IPv6 brackets."""
    name = header.strip().lower()
    if name.startswith("["):  # [::1]:5555
        return name[1:].split("]", 1)[0]
    if name.count(":") == 1:  # name:port (a bare IPv6 address has more colons)
        name = name.split(":", 1)[0]
    return name.rstrip(".")


def allowed_hosts(extra: Iterable[str], address: str) -> frozenset[str]:
    """The loopback names, the names given, and the listening address if it is one IP."""
    names = set(LOOPBACK_HOSTS) | {host_name(e) for e in extra}
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        if not ip.is_unspecified:
            names.add(str(ip))
    return frozenset(names)


class DisallowedHost(Matcher):
    """Matches every request whose Host is not on the allowlist."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        return None if host_name(request.host) in self.allowed else {}


class ForbiddenHost(RequestHandler):
    """403 for any method, in one line, naming nothing of the fleet."""

    def prepare(self) -> None:
        self.set_status(HTTP_FORBIDDEN)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("403: this Host is not one Flower answers to (drover flower --allowed-host)\n")

    def check_xsrf_cookie(self) -> None:
        """The answer is 403 anyway; no XSRF check first."""


def host_rule(allowed: frozenset[str]) -> Rule:
    """The rule to put first in a Tornado application's router."""
    return Rule(DisallowedHost(allowed), ForbiddenHost)
