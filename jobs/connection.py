"""Reaching Redis: what an outage looks like, and a retry that rides one out for a time."""

from __future__ import annotations

import builtins
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

from config.redis_sentinel import is_sentinel, parse_sentinel_url

RETRY_CAP_S = 1.0
RETRY_BASE_S = 0.05
# What an outage looks like to redis-py: its own connection errors (a dropped connection,
# a server still loading its AOF) and timeouts, and the OS errors of a connect to a server
# that is not there (refused, reset; a unix socket removed while it is stopped). redis-py's
# own Retry leaves the OS errors out, so a refused connect was never retried.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    socket.timeout,
    builtins.ConnectionError,
    FileNotFoundError,
)

# The longest a TLS handshake with Redis may take when the caller set no connect timeout.
# redis-py runs the handshake under the socket's reply timeout, which drover leaves unset
# (a follow blocks for up to `wait_block`): a `rediss://` URL pointed at a Redis without TLS
# then hung for ever, the server waiting for the end of a command line that never comes.
TLS_HANDSHAKE_TIMEOUT_S = 10.0

T = TypeVar("T")


class BoundedTLSConnection(redis.SSLConnection):
    """redis-py's TLS connection with its handshake bounded (TLS_HANDSHAKE_TIMEOUT_S, or the
    connect timeout when one is set); a handshake that times out says what it likely is."""

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> Any:
        limit = self.socket_connect_timeout or TLS_HANDSHAKE_TIMEOUT_S
        sock.settimeout(limit)
        try:
            wrapped = super()._wrap_socket_with_ssl(sock)  # type: ignore[no-untyped-call]
        except TimeoutError:  # socket.timeout
            raise redis.ConnectionError(
                f"{self.host}:{self.port} did not answer a TLS handshake within {limit:g}s "
                "(is it a Redis without TLS? rediss:// needs one with TLS)"
            ) from None
        wrapped.settimeout(self.socket_timeout)
        return wrapped


class OutageRetry(Retry):
    """Retry a Redis call through an outage for `retry_for` seconds from when it started.

    redis-py counts attempts, and its connection pool connects outside the command's retry
    with a Retry that does not cover a refused connect, so `retry_on_error` alone never rode
    out a stopped server: a command failed at once. Here the connect is retried too (it runs
    this same Retry), for a time rather than a count: a connect retried inside a command's
    retry spends the same budget, so the two never add up to more than `retry_for`. A wrong
    password is not an outage and fails at once.
    """

    def __init__(self, retry_for: float) -> None:
        super().__init__(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), -1, OUTAGE_ERRORS)
        self.retry_for = retry_for

    def call_with_retry(self, do: Callable[[], T], fail: Callable[[Exception], Any]) -> T:
        started = time.monotonic()  # (ExponentialBackoff keeps no state to reset)
        failures = 0
        while True:
            try:
                return do()
            except redis.AuthenticationError:
                raise
            except self._supported_errors as error:
                failures += 1
                fail(error)
                left = self.retry_for - (time.monotonic() - started)
                if left <= 0:
                    raise error
                time.sleep(min(self._backoff.compute(failures), left))


class Guard(Protocol):
    """Runs one Redis call on a caller's terms (a follower riding out an outage)."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


def direct(fn: Callable[[], T], /) -> T:
    return fn()


def client_for(
    url: str, *, retry_for: float = 0.0, probe_timeout: float | None = None
) -> redis.Redis:
    """A client on `url` (strings in and out); with `retry_for`, each command rides out an
    outage that long. Without it, `probe_timeout` bounds the connect and each reply: a
    server that does not answer is an outage too.

    For a Sentinel set (config/redis_sentinel.py) the client is the master's: each connect
    asks the sentinels where the master is, and a connection to a master that went away
    (or came back as a replica: READONLY) fails as an outage, so OutageRetry rides a
    failover out like a restart and reconnects to the master the sentinels promoted.
    """
    options: dict[str, Any] = {"decode_responses": True}
    if probe_timeout is not None and retry_for <= 0:
        options |= {"socket_connect_timeout": probe_timeout, "socket_timeout": probe_timeout}
    if retry_for > 0:
        options["retry"] = OutageRetry(retry_for)
    if is_sentinel(url):
        return sentinel_master(url, **options)
    if url.startswith("rediss://"):
        options["connection_class"] = BoundedTLSConnection
    return redis.Redis.from_url(url, **options)


def sentinel_master(url: str, **options: Any) -> redis.Redis:
    """The master of the Sentinel set `url`, through redis-py's Sentinel (`options` go to
    the master's connections)."""
    s = parse_sentinel_url(url)
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs(), **s.credentials(), db=s.db
    )
    master: redis.Redis = sentinels.master_for(s.master_name, **options)  # type: ignore[no-untyped-call]
    return master


def queue_script(pipe: Any, script: Script, keys: list[Any], args: list[Any] | None = None) -> None:
    """Stack `script` on a pipeline as EVAL with its text.

    redis-py stacks a registered script as EVALSHA and, to be sure of it, asks SCRIPT EXISTS
    in a round trip of its own before every such pipeline: a second round trip for every
    event appended, phase claimed or job ended. EVAL with the text needs none, and cannot
    meet a script cache emptied by a restart (NOSCRIPT halfway through a MULTI). Redis
    caches the compiled script either way.
    """
    pipe.eval(script.script, len(keys), *keys, *(args or []))
