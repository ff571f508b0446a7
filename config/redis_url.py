"""What `redis_url` may look like: one form that every Redis client in drover reads alike.

The URL reaches redis-py (the job store, the beat, Flower's check), kombu (the Celery broker)
and redbeat, and each fails in its own way on what it does not expect, deep inside a client
and as a traceback: urllib raises ValueError only when a port of `abc` or `99999` is read,
redis-py turns an unknown query key into a connection keyword (`?connection_class=x`), and
kombu raises TypeError for any query key but `ssl_*`. So the URL is checked once, when the
settings load (config/settings.py), and refused in one line:

- `redis://` or `rediss://`; printable ASCII only; no fragment;
- a password with `/`, `?` or `#` percent-encoded (raw, they would end the host part early);
- a host (an IP address or a host name), a port in 1..65535, a database number;
- query parameters only on `rediss://` and only `ssl_cert_reqs`, `ssl_ca_certs`,
  `ssl_certfile` and `ssl_keyfile` (docs/security.md), each once, the files as plain absolute
  paths; `ssl_cert_reqs=none` or `optional` (`CERT_NONE`, `CERT_OPTIONAL`) only with
  `[security] insecure = true`: TLS that does not verify the server hands the Redis password,
  and with it every worker, to whoever sits on the path.

No message ever shows the password: problems quote only the part after the credentials.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl

SCHEMES = ("redis", "rediss")
TLS_SCHEME = "rediss"
SSL_CERT_REQS = "ssl_cert_reqs"
FILE_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
ALLOWED_PARAMS = (SSL_CERT_REQS, *FILE_PARAMS)
# How each client spells the modes: redis-py reads only the lower-case words, kombu both.
VERIFIED = "required"
UNVERIFIED = frozenset({"none", "optional"})
UNVERIFIED_CONSTANTS = frozenset({"CERT_NONE", "CERT_OPTIONAL"})
CONSTANT_WORDS = {"CERT_REQUIRED": "required", "CERT_OPTIONAL": "optional", "CERT_NONE": "none"}
MAX_PORT = 65535
# Redis keeps the number of databases in a C int.
MAX_DB_INDEX = 2**31 - 1
MAX_PATH_CHARS = 255
MAX_SHOWN_CHARS = 80
FORM = "redis[s]://[USER:PASSWORD@]HOST[:PORT][/DB]"

_PRINTABLE_ASCII = re.compile(r"^[\x21-\x7e]+\Z")
# After the credentials: authority, path, query; '#' is refused before this is used.
_REST = re.compile(r"^(?P<authority>[^/?]*)(?P<path>[^?]*)(?:\?(?P<query>.*))?\Z")
_AUTHORITY = re.compile(r"^(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>.*))?\Z")
# Host names as resolvers and container runtimes use them (compose service names may hold _).
_HOST_NAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z"
)
_PORT = re.compile(r"^[0-9]{1,5}\Z")
_DB = re.compile(r"^/?\Z|^/(?P<db>[0-9]{1,10})\Z")
_PLAIN_PATH = re.compile(rf"^/[A-Za-z0-9._/-]{{1,{MAX_PATH_CHARS}}}\Z")


def _shown(value: str) -> str:
    if len(value) <= MAX_SHOWN_CHARS:
        return repr(value)
    return f"{value[:MAX_SHOWN_CHARS]!r}... ({len(value)} characters)"


def _host_problem(host: str) -> str | None:
    if not host:
        return f"has no host ({FORM})"
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            if "%" not in inner:  # a scope id would be percent-encoded, and read two ways
                ipaddress.IPv6Address(inner)
                return None
        except ValueError:
            pass
        return f"host {_shown(host)}: brackets hold an IPv6 address only (no scope id)"
    if _HOST_NAME.match(host):
        return None
    return f"host {_shown(host)} is not an IP address or host name"


def _query_problem(query: str, scheme: str, insecure: bool) -> str | None:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return "has a malformed query (NAME=VALUE&...)"
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        return "repeats a query parameter"
    allowed = ", ".join(ALLOWED_PARAMS)
    for name, value in pairs:
        if name not in ALLOWED_PARAMS:
            # The name only: a value could be a secret (`?password=...`).
            return f"query parameter {_shown(name)} is not allowed (only {allowed})"
        if scheme != TLS_SCHEME:
            return f"{name} needs rediss:// (TLS); redis:// has no certificates to check"
        if name in FILE_PARAMS:
            if not _PLAIN_PATH.match(value) or ".." in value.split("/"):
                return f"{name}={_shown(value)} must be a plain absolute path"
            continue
        if (value in UNVERIFIED or value in UNVERIFIED_CONSTANTS) and not insecure:
            return (
                f"{name}={value} does not verify the Redis server's certificate, so whoever "
                "sits on the path gets the password; use ssl_cert_reqs=required with "
                "ssl_ca_certs=FILE, or set [security] insecure = true"
            )
        if value in CONSTANT_WORDS:
            return f"{name}={value}: write {CONSTANT_WORDS[value]} (redis-py reads only words)"
        if value != VERIFIED and value not in UNVERIFIED:
            return f"{name}={_shown(value)} must be required, optional or none"
    return None


def _problem(url: str, insecure: bool) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        return "must start with redis://, rediss:// or sentinel:// (docs/sentinel.md)"
    if not _PRINTABLE_ASCII.match(url):
        return "has whitespace, control or non-ASCII characters"
    credentials, at, remainder = rest.rpartition("@")
    if at and any(c in credentials for c in "/?#"):
        # Clients would end the host part at that character and read the rest as the host.
        return "has '/', '?' or '#' before its last '@': percent-encode them in the password"
    if "#" in remainder:
        return "has a fragment (#)"
    parts = _REST.match(remainder)
    authority = _AUTHORITY.match(parts["authority"]) if parts else None
    if parts is None or authority is None:
        return f"has a malformed host part ({FORM})"
    problem = _host_problem(authority["host"])
    if problem:
        return problem
    port = authority["port"]
    if port is not None and not (_PORT.match(port) and 1 <= int(port) <= MAX_PORT):
        return f"port {_shown(port)} is not a number from 1 to {MAX_PORT}"
    db = _DB.match(parts["path"])
    if db is None or (db["db"] is not None and int(db["db"]) > MAX_DB_INDEX):
        return f"database {_shown(parts['path'])} must be a number ({FORM})"
    query = parts["query"]
    if query is None:
        return None
    return _query_problem(query, scheme, insecure) if query else "has an empty query ('?')"


def check_redis_url(url: str, insecure: bool) -> str:
    """`url` if every drover client reads it alike and it verifies TLS (unless `insecure`);
    else ValueError, one line starting `redis_url`, never showing the password. (A Sentinel
    set, `sentinel://`, is config/redis_sentinel.py's: `check_any_redis_url` takes both.)"""
    problem = _problem(url, insecure)
    if problem is not None:
        raise ValueError(f"redis_url {problem}")
    return url
