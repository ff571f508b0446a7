"""Following a job through a Redis outage: retry with a deadline, say so once, never pretend.

A job goes on while Redis is away (its worker holds its events and rides the outage out), so
whoever follows it should too: `drover migrate --wait`, `drover events --follow` and
`Drover.wait` call Redis through an OutageRider. An outage is announced in one line when it
starts and in one line when it ends; one that outlasts the limit (tunables.wait_redis_outage)
ends the wait with RedisOutage, which says that the job goes on and how to follow it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

from jobs.errors import BrokerUnavailable

T = TypeVar("T")
# How often a follower tries Redis again during an outage (each try also spends the
# producer's own short retry, tunables.producer_redis_retry_for).
RETRY_EVERY_S = 1.0


class RedisOutage(redis.ConnectionError, BrokerUnavailable):
    """Redis stayed away longer than a follower rides out; the message is one line. The
    Python API's outage (BrokerUnavailable), as every other of its calls reports one."""


class OutageRider:
    """Run Redis calls for one follower, riding out outages of up to `limit` seconds.

    `where` names Redis (host:port, never the password) and `what` what is being followed;
    `notice` gets the one-line announcements; past `deadline` (time.monotonic) the caller's
    own timeout applies and TimeoutError is raised instead.
    """

    def __init__(
        self,
        where: str,
        what: str,
        limit: float,
        notice: Callable[[str], None],
        *,
        deadline: float | None = None,
        follow_again: str = "",
    ) -> None:
        self.where = where
        self.what = what
        self.limit = limit
        self.notice = notice
        self.deadline = deadline
        self.follow_again = follow_again
        self.down_since: float | None = None

    def __call__(self, fn: Callable[[], T], /) -> T:
        while True:
            try:
                result = fn()
            except redis.AuthenticationError:
                raise  # a wrong password is not an outage
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._wait_out(exc)
                continue
            if self.down_since is not None:
                away = time.monotonic() - self.down_since
                self.down_since = None
                self.notice(f"Redis at {self.where} is back after {away:.0f}s; following again")
            return result

    def _wait_out(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        if self.down_since == now and self.limit > 0:
            self.notice(
                f"Redis at {self.where} is unreachable ({exc}); {self.what} goes on, still "
                f"following for up to {self.limit:g}s"
            )
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(
                f"{self.what}: no answer from Redis at {self.where} before the timeout"
            )
        if now - self.down_since >= self.limit:
            again = f" ({self.follow_again})" if self.follow_again else ""
            raise RedisOutage(
                f"Redis at {self.where} unreachable for {self.limit:g}s ({exc}); "
                f"{self.what} goes on without us{again}"
            ) from None
        pause = RETRY_EVERY_S
        if self.deadline is not None:
            pause = min(pause, self.deadline - now)
        time.sleep(max(pause, 0.0))
