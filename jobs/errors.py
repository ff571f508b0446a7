"""The refusals every entry point reports the same way: the CLI, the Python API, schedules.

`SubmitError` is a request refused before anything was queued (`BadArgument`, one of them: an
argument of the Python API of the wrong type or out of bounds); `BrokerUnavailable` is Redis
or the broker out of reach. Each carries one line that names where, never a password.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from inspect import isfunction
from types import GeneratorType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis

from config.redis_sentinel import is_sentinel, parse_sentinel_url

DEFAULT_REDIS_PORT = 6379
C = TypeVar("C", bound=type)
M = TypeVar("M")


class SubmitError(Exception):
    """The request was refused before anything was queued; the message is one line."""


class BadArgument(SubmitError):
    """An argument of the Python API (producer/api.py) of the wrong type or out of the bounds
    the CLI applies, refused before Redis is asked anything; the message is one line."""


class BrokerUnavailable(Exception):
    """Redis (or the broker) could not be reached, or stopped answering; one line naming
    where. Only an outage: a request or a program in error is never reported as one."""


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


def is_outage(exc: BaseException) -> bool:
    """Redis or the broker out of reach: refused, reset or timed out, no master (a refused
    password too: nothing can be asked of it). Never an error of the request or the program."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError)):
        return True
    kombu = sys.modules.get("kombu.exceptions")  # loaded before kombu could raise anything
    return kombu is not None and isinstance(exc, (kombu.OperationalError, kombu.ConnectionError))


@contextmanager
def broker_errors(redis_url: str) -> Iterator[None]:
    """Redis or the broker out of reach: BrokerUnavailable, one line naming where, never the
    password. Anything else goes through as it is."""
    try:
        yield
    except (SubmitError, BrokerUnavailable):
        raise
    except Exception as exc:
        if not is_outage(exc):
            raise
        what = "Redis" if isinstance(exc, redis.RedisError) else "the broker"
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BrokerUnavailable(
            f"cannot reach {what} at {redis_location(redis_url)}: {said}"
        ) from None


def reporting_outages(cls: C) -> C:
    """Every public method of `cls` (the Python API's, whose objects have `settings`) reports
    an outage as BrokerUnavailable (broker_errors), and a generator it returns as it is read."""
    for name, attr in list(vars(cls).items()):
        if not name.startswith("_") and isfunction(attr):
            setattr(cls, name, _reporting(attr))
    return cls


def _reporting(method: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        url = cast(str, self.settings.redis_url)
        with broker_errors(url):
            result = method(self, *args, **kwargs)
        return _reading(result, url) if isinstance(result, GeneratorType) else result

    return call


def _reading(items: Iterator[Any], url: str) -> Iterator[Any]:
    with broker_errors(url):
        yield from items


def require(name: str, value: object, *kinds: type) -> None:
    """BadArgument unless `value` is one of `kinds` (None only if NoneType is one; a bool
    is never taken for a number)."""
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return
    names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise BadArgument(f"{name} must be {names}, not {type(value).__name__}")


def require_seconds(name: str, value: object) -> None:
    """A timeout: None, or a finite number of seconds above 0 (as `--timeout`: nan never
    expires, inf is no bound, and a wait of 0 or less would end before it began)."""
    require(name, value, int, float, type(None))
    if value is None:
        return
    seconds = cast(float, value)
    if not math.isfinite(seconds):
        raise BadArgument(f"{name} must be a finite number of seconds, not {seconds:g}")
    if seconds <= 0:
        raise BadArgument(f"{name} must be above 0 seconds, not {seconds:g}")


def require_id(job_id: object) -> str:
    """A job's or an evacuation's id: a str (anything else would be looked up as its str)."""
    require("job_id", job_id, str)
    return cast(str, job_id)


def spec_or_request(
    spec: object, request: dict[str, Any], kind: type, check: Callable[..., M]
) -> M:
    """What the API submits: a spec `check`ed from the keywords, or the caller's `kind` spec
    checked again from its fields (a model_copy(update=...) was never validated); never both:
    one would be silently dropped."""
    if spec is None:
        return check(**request)
    if request:
        raise BadArgument(f"give a spec or keywords, not both ({', '.join(sorted(request))})")
    require("spec", spec, kind)
    try:
        fields = spec.model_dump()  # type: ignore[attr-defined]
    except Exception as exc:  # one made without validation (model_construct) may lack fields
        raise BadArgument(f"spec cannot be read: {str(exc).splitlines()[0]}") from None
    return check(**fields)


class ControlUnanswered(TimeoutError):
    """An operator's control got no answer from the source's worker in time; the message says
    what may still happen to the request (one line, said as it is)."""
