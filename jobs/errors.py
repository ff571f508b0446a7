"""The refusals every entry point reports the same way: the CLI, the Python API, schedules.

`SubmitError` is a request refused before anything was queued; `BrokerUnavailable` is Redis
or the broker out of reach. Both carry one line that names where, never a password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis

from config.redis_sentinel import is_sentinel, parse_sentinel_url

DEFAULT_REDIS_PORT = 6379


class SubmitError(Exception):
    """The request was refused before anything was queued; the message is one line."""


class BrokerUnavailable(Exception):
    pass


def redis_location(url: str) -> str:
    """host:port of a Redis URL (a Sentinel set's master name and sentinels), never its
    password."""
    if is_sentinel(url):
        try:
            return parse_sentinel_url(url).location()
        except ValueError:
            return "a Sentinel set"
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or DEFAULT_REDIS_PORT}"


@contextmanager
def broker_errors(redis_url: str) -> Iterator[None]:
    """Redis or the broker out of reach: one line naming where, never the password."""
    try:
        yield
    except SubmitError:
        raise
    except redis.RedisError as exc:
        raise BrokerUnavailable(
            f"cannot reach Redis at {redis_location(redis_url)}: {exc}"
        ) from None
    except Exception as exc:  # kombu wraps connection errors in its own types
        raise BrokerUnavailable(
            f"cannot queue the job on {redis_location(redis_url)}: {exc}"
        ) from None
