"""`redis_url` naming a Redis Sentinel set, and what each client is given for it.

Why one form of drover's own, translated per client: redis-py, kombu and redbeat each take a
Sentinel set differently (redis-py a `Sentinel(...)` object, kombu `sentinel://` parts joined
by `;` plus transport options, redbeat a `redis-sentinel://` URL plus options), and none of
them checks what it is given. The form is kombu's, with the master's name and the database
at the end, so one string in drover.toml serves every client and is checked once:

    sentinel://[USER:PASSWORD@]HOST[:PORT];sentinel://HOST[:PORT];...[/DB]?master_name=NAME

- the credentials are the Redis user's (a role's, docs/redis-acl.md): on the first part only,
  or the same on every part; they authenticate to the master and to the sentinels, unless
  `sentinel_auth=none` says the sentinels take no password;
- PORT defaults to 26379; no sentinel twice; the database and query only after the last;
- no TLS: the sentinels and nodes are reached in clear text (docs/sentinel.md says so).

No message ever shows the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from redis.credentials import UsernamePasswordCredentialProvider

from config import redis_url as single

SCHEME = "sentinel"
PREFIX = f"{SCHEME}://"
SEPARATOR = ";"
DEFAULT_SENTINEL_PORT = 26379
MAX_SENTINELS = 16
MASTER_NAME = "master_name"
SENTINEL_AUTH = "sentinel_auth"
AUTH_MODES = ("url", "none")
ALLOWED_PARAMS = (MASTER_NAME, SENTINEL_AUTH)
# A reply from a sentinel is a few bytes; one that does not answer in this long is down, and
# the client asks the next one (otherwise a dead sentinel's host stalls every reconnect).
SENTINEL_SOCKET_TIMEOUT_S = 1.0
FORM = "sentinel://[USER:PASSWORD@]HOST[:PORT];sentinel://HOST[:PORT];...[/DB]?master_name=NAME"
# What `redis-sentinel` accepts as a master's name, kept to characters no client re-reads.
_MASTER = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


@dataclass(frozen=True)
class SentinelUrl:
    """A checked Sentinel `redis_url`: the sentinels, the master's name and the Redis user."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    username: str | None
    password: str | None
    db: int
    sentinel_auth: bool
    userinfo: str  # as written (percent-encoded), for kombu's URL

    def credentials(self) -> dict[str, Any]:
        """The Redis user's keywords for redis-py (nothing when the URL has none)."""
        found = {"username": self.username, "password": self.password}
        return {k: v for k, v in found.items() if v}

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How a client talks to the sentinels themselves (not to the master).

        The credentials go in a credential provider, not as `password`: redis-py's
        "No master found" error quotes each sentinel's connection pool, every keyword
        included, and clients (kombu, Celery's log) print that error as it is."""
        timeouts: dict[str, Any] = {
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S,
        }
        if self.sentinel_auth and self.password:
            timeouts["credential_provider"] = UsernamePasswordCredentialProvider(
                self.username, self.password
            )
        return timeouts

    def location(self) -> str:
        """What an error names: the master's name and the sentinels, never the password."""
        where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel master {self.master_name} via {where}"


def is_sentinel(url: str) -> bool:
    return url.startswith(PREFIX)


class _Refused(ValueError):
    pass


def _sentinel(part: str, index: int) -> tuple[str, str, int]:
    """(userinfo as written, host, port) of one `sentinel://` part (the path already cut)."""
    if not part.startswith(PREFIX):
        raise _Refused(f"does not start with {PREFIX} (separate sentinels with ';{PREFIX}')")
    userinfo, at, authority = part[len(PREFIX) :].rpartition("@")
    if at and any(c in userinfo for c in "/?#"):
        raise _Refused("has '/', '?' or '#' before an '@': percent-encode them in the password")
    if at and SEPARATOR in userinfo:
        raise _Refused("has ';' in its credentials: percent-encode it in the password")
    match = single._AUTHORITY.match(authority)
    if match is None or "/" in authority or "?" in authority:
        raise _Refused(f"sentinel {index} has a malformed host part ({FORM})")
    problem = single._host_problem(match["host"])
    if problem:
        raise _Refused(f"sentinel {index} {problem.replace(single.FORM, FORM)}")
    port = match["port"]
    if port is not None and not (single._PORT.match(port) and 1 <= int(port) <= single.MAX_PORT):
        raise _Refused(f"sentinel {index} port {single._shown(port)} is not 1 to {single.MAX_PORT}")
    host = match["host"].strip("[]")
    return (userinfo if at else ""), host, int(port) if port else DEFAULT_SENTINEL_PORT


def _query(query: str | None) -> tuple[str, bool]:
    if not query:
        raise _Refused(f"names no master: add ?{MASTER_NAME}=NAME ({FORM})")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _Refused("has a malformed query (NAME=VALUE&...)") from None
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _Refused("repeats a query parameter")
    params = dict(pairs)
    unknown = [name for name in names if name not in ALLOWED_PARAMS]
    if unknown:
        if unknown[0].startswith("ssl_"):
            raise _Refused("sentinel:// has no TLS in drover: use rediss:// to one server")
        allowed = ", ".join(ALLOWED_PARAMS)
        raise _Refused(f"query parameter {single._shown(unknown[0])} is not allowed ({allowed})")
    master = params.get(MASTER_NAME, "")
    if not _MASTER.match(master):
        raise _Refused(f"{MASTER_NAME} must be 1-64 letters, digits, '.', '_' or '-' ({FORM})")
    auth = params.get(SENTINEL_AUTH, AUTH_MODES[0])
    if auth not in AUTH_MODES:
        raise _Refused(f"{SENTINEL_AUTH} must be {' or '.join(AUTH_MODES)}")
    return master, auth == AUTH_MODES[0]


def _parse(url: str) -> SentinelUrl:
    if not single._PRINTABLE_ASCII.match(url):
        raise _Refused("has whitespace, control or non-ASCII characters")
    if "#" in url.rpartition("@")[2]:
        raise _Refused("has a fragment (#)")
    head, qmark, query = url.partition("?")
    if qmark and "@" in query:
        raise _Refused("has '@' after '?': credentials go before the first host")
    # A part starts at each `;sentinel://`: a raw ';' elsewhere stays inside its part (and is
    # refused there), so no piece of a password is ever read, and shown, as a host or port.
    parts = re.split(f"{SEPARATOR}(?={PREFIX})", head)
    if len(parts) > MAX_SENTINELS:
        raise _Refused(f"names more than {MAX_SENTINELS} sentinels")
    cred, at, rest = parts[-1].rpartition("@")
    start = 0 if at else len(PREFIX)
    slash = rest.find("/", start)
    path = rest[slash:] if slash >= 0 else ""
    parts[-1] = cred + at + (rest[:slash] if slash >= 0 else rest)
    found = [_sentinel(part, i) for i, part in enumerate(parts, start=1)]
    first = found[0][0]
    others = {info for info, _, _ in found[1:]}
    if others and others not in ({""}, {first}):
        raise _Refused("gives sentinels different credentials (give them once, on the first)")
    addresses = [(host, port) for _, host, port in found]
    if len(set(addresses)) != len(addresses):
        raise _Refused("names a sentinel twice")
    db = single._DB.match(path)
    if db is None or (db["db"] is not None and int(db["db"]) > single.MAX_DB_INDEX):
        raise _Refused(f"database {single._shown(path)} must be a number ({FORM})")
    master, auth = _query(query if qmark else None)
    userinfo = found[0][0]
    user, _, password = userinfo.partition(":")
    return SentinelUrl(
        sentinels=tuple(addresses),
        master_name=master,
        username=unquote(user) or None,
        password=unquote(password) or None,
        db=int(db["db"] or 0),
        sentinel_auth=auth,
        userinfo=userinfo,
    )


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The Sentinel set `url` names; ValueError, one line starting `redis_url`, never
    showing the password."""
    try:
        return _parse(url)
    except _Refused as exc:
        raise ValueError(f"redis_url {exc}") from None


def check_any_redis_url(url: str, insecure: bool) -> str:
    """`url` if it is a good Sentinel set or a good single server's URL (config/redis_url.py);
    else ValueError, one line starting `redis_url`, never showing the password."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return url
    return single.check_redis_url(url, insecure)


def kombu_broker(url: str) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL and transport options: every sentinel as a `sentinel://` part, the
    user and the database on the first (kombu reads them there), the master's name and the
    sentinels' credentials as options."""
    s = parse_sentinel_url(url)
    cred = f"{s.userinfo}@" if s.userinfo else ""
    parts = [
        f"{PREFIX}{cred if i == 0 else ''}{_hostport(h, p)}" for i, (h, p) in enumerate(s.sentinels)
    ]
    parts[0] += f"/{s.db}"
    return SEPARATOR.join(parts), {
        "master_name": s.master_name,
        "sentinel_kwargs": s.sentinel_kwargs(),
    }


def redbeat_settings(url: str) -> tuple[str, dict[str, Any]]:
    """redbeat's `redbeat_redis_url` (only its scheme is read) and `redbeat_redis_options`."""
    s = parse_sentinel_url(url)
    host, port = s.sentinels[0]
    options = {
        "sentinels": list(s.sentinels),
        "service_name": s.master_name,
        "db": s.db,
        "sentinel_kwargs": s.sentinel_kwargs(),
        **s.credentials(),
    }
    return f"redis-sentinel://{_hostport(host, port)}/{s.db}", options


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def with_user(url: str, user: str, password: str) -> str:
    """`url` (a Sentinel set) with `user` and `password` on its first part, and on no other."""
    parse_sentinel_url(url)
    head, qmark, query = url.partition("?")
    parts = [p.removeprefix(PREFIX).rpartition("@")[2] for p in head.split(SEPARATOR)]
    parts[0] = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts[0]}"
    return SEPARATOR.join(PREFIX + p for p in parts) + qmark + query
