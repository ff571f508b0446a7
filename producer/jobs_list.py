"""`drover jobs` and `Drover.jobs`: the newest records through the listing indexes
(jobs/listing.py), with their filters checked into one-line refusals.

Kept apart from producer/api.py so that listing imports no Celery: the whole `drover jobs`
command is meant to answer within a few hundred milliseconds, Python's start-up included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from config.addresses import shown
from config.settings import ConfigError, Settings
from jobs.connection import client_for
from jobs.errors import BadArgument, SubmitError, broker_errors, require
from jobs.listing import ALL_STATES, JobFilter, fetch, recent_ids
from jobs.model import Job
from jobs.retention import retention_seconds

if TYPE_CHECKING:
    from jobs.evacuation_model import Evacuation

_DURATION = re.compile(r"^(?P<n>[0-9]{1,6})(?P<unit>[smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# `drover jobs --limit` and Drover.jobs' `limit`: how many records one listing may return.
MIN_LIMIT, MAX_LIMIT = 1, 10_000
# Drover.jobs' filters: job_filter's, as `drover jobs` gives them.
FILTERS = ("states", "host", "since")


def parse_since(text: str, now: datetime) -> float:
    """`--since`: a duration back from now (30s, 30m, 2h, 7d, 2w) or an ISO 8601 time (UTC
    when it names no zone); epoch seconds, or SubmitError with one line."""
    found = _DURATION.match(text.strip())
    if found:
        return (now - timedelta(seconds=int(found["n"]) * _UNIT_S[found["unit"]])).timestamp()
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SubmitError(
            f"--since {shown(text)} is neither a duration (30m, 2h, 7d) nor an ISO time "
            "(2026-05-01T12:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when > now:
        raise SubmitError(f"--since {shown(text)} is in the future")
    return when.timestamp()


def parse_states(values: Iterable[str]) -> frozenset[str]:
    """`--state`, repeated or comma-separated; SubmitError naming the states there are.

    An empty name (`--state ''`, `--state ,`, `running,`) is refused: skipped, it would leave
    no filter at all and list every job, not the states the operator meant.
    """
    names = [s.strip() for v in values for s in v.split(",")]
    if "" in names:
        raise SubmitError(f"--state names an empty state (states: {', '.join(sorted(ALL_STATES))})")
    states = frozenset(names)
    unknown = sorted(states - ALL_STATES)
    if unknown:
        raise SubmitError(
            f"unknown state {shown(unknown[0])} (states: {', '.join(sorted(ALL_STATES))})"
        )
    return states


def job_filter(
    settings: Settings,
    *,
    states: Iterable[str] = (),
    host: str | None = None,
    since: str | None = None,
    now: datetime | None = None,
) -> JobFilter:
    """The filter of `drover jobs`' options, or SubmitError with one line (an unknown
    state, a host the registry does not name, a `--since` that is not a time)."""
    if host is not None:
        try:
            settings.host(host)
        except ConfigError as exc:
            raise SubmitError(str(exc)) from None
    at = now or datetime.now(UTC)
    return JobFilter(
        states=parse_states(states),
        host=host,
        since=parse_since(since, at) if since is not None else None,
    )


def api_listing(settings: Settings, limit: object, filters: dict[str, Any]) -> JobFilter:
    """Drover.jobs' arguments checked as `drover jobs` checks its options, or BadArgument
    with one line: a limit within MIN_LIMIT..MAX_LIMIT, states as a collection of names (one
    str would be read letter by letter), `host` and `since` as str; then job_filter's checks."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not MIN_LIMIT <= limit <= MAX_LIMIT:
        raise BadArgument(f"limit must be an int from {MIN_LIMIT} to {MAX_LIMIT}, not {limit!r}")
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise BadArgument(f"unknown filter {unknown[0]!r} (filters: {', '.join(FILTERS)})")
    states = filters.get("states", ())
    require("states", states, list, tuple, set, frozenset)
    for state in states:
        require("each of states", state, str)
    require("host", filters.get("host"), str, type(None))
    require("since", filters.get("since"), str, type(None))
    return job_filter(settings, **filters)


def list_jobs(
    settings: Settings,
    flt: JobFilter,
    limit: int,
    *,
    full: bool = True,
    unreadable: list[str] | None = None,
) -> list[Job | Evacuation]:
    """Newest first: migration jobs and evacuations passing `flt`, at most `limit`; without
    `full`, without a job's phases and history or an evacuation's children (jobs/listing.py).
    With `unreadable`, records drover cannot read are left out and said there."""
    r = client_for(settings.redis_url, retry_for=settings.tunables.producer_redis_retry_for)
    with broker_errors(settings.redis_url):  # an outage only: DataError is a program's error
        ids = recent_ids(
            r,
            flt,
            limit,
            now_s=datetime.now(UTC).timestamp(),
            retention_s=retention_seconds(settings.tunables.job_retention_days),
        )
        return fetch(r, ids, full=full, unreadable=unreadable)
