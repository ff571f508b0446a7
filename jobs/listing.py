"""`drover jobs`: the newest records, filtered, read from indexes and never by scanning.

Every index is a sorted set of record ids scored by creation time (jobs/keys.py): all records
(JOBS_INDEX), per host (a migration under its source and its destination, an evacuation under
its host), and per final state (filed by the end script, jobs/retention.py). Live records are
the active sets, as few as the fleet runs at once. So a listing reads at most `limit` ids
per index it needs, then fetches just those records in one pipeline:

- no filter: the newest of JOBS_INDEX;
- `--state`: the newest of each final state's index, and the active records in a live state;
- `--host`: that host's index, page by page, checking a `--state` on each record's state;
- `--since`: the lowest score read. Nothing older than the retention is read either: an
  index is trimmed only when a record ends, so a quiet host's may hold older entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import redis

from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    JOBS_INDEX,
    children_key,
    job_key,
    jobs_by_host_key,
    jobs_by_state_key,
    phases_key,
    transitions_key,
)
from jobs.model import Job
from jobs.record import MalformedRecord
from jobs.record_read import evacuation_from, job_from
from jobs.states import EVACUATION_KIND, EVACUATION_TERMINAL, TERMINAL, EvacuationState, JobState

if TYPE_CHECKING:  # a listing of migrations alone never loads the evacuation models
    from jobs.evacuation_model import Evacuation

FINAL_STATES = frozenset(s.value for s in (*TERMINAL, *EVACUATION_TERMINAL))
ALL_STATES = frozenset(s.value for s in (*JobState, *EvacuationState))
# Ids read at once from a host's index when a state filter may pass over many of them.
HOST_PAGE = 500


@dataclass(frozen=True)
class JobFilter:
    """What `drover jobs` shows: any of `states` (none: all), from or to `host`, created at
    or after `since` (epoch seconds)."""

    states: frozenset[str] = field(default_factory=frozenset)
    host: str | None = None
    since: float | None = None


def recent_ids(
    r: redis.Redis, flt: JobFilter, limit: int, *, now_s: float, retention_s: float
) -> list[str]:
    """The ids of the newest `limit` records passing `flt`, newest first."""
    low = max(now_s - retention_s, flt.since if flt.since is not None else -math.inf)
    if flt.host is not None:
        return _host_ids(r, jobs_by_host_key(flt.host), flt.states, low, limit)
    if not flt.states:
        return [i for i, _ in _newest(r, [JOBS_INDEX], low, limit)]
    final = sorted(flt.states & FINAL_STATES)
    found = _newest(r, [jobs_by_state_key(s) for s in final], low, limit)
    live = flt.states - FINAL_STATES
    if live:
        found += _live(r, live, low)
    found.sort(key=lambda pair: pair[1], reverse=True)
    return [i for i, _ in found[:limit]]


def _newest(r: redis.Redis, keys: list[str], low: float, limit: int) -> list[tuple[str, float]]:
    with r.pipeline(transaction=False) as p:
        for key in keys:
            p.zrevrangebyscore(key, "+inf", low, start=0, num=limit, withscores=True)
        pages = cast(list[list[tuple[str, float]]], p.execute())
    merged = sorted((pair for page in pages for pair in page), key=lambda x: x[1], reverse=True)
    return merged[:limit]


def _live(r: redis.Redis, states: frozenset[str], low: float) -> list[tuple[str, float]]:
    """Active records in one of `states`, created at or after `low`."""
    with r.pipeline(transaction=False) as p:
        p.smembers(ACTIVE_JOBS)
        p.smembers(ACTIVE_EVACUATIONS)
        jobs, evacuations = cast(list[set[str]], p.execute())
    ids = sorted(jobs | evacuations)
    with r.pipeline(transaction=False) as p:
        for job_id in ids:
            p.hget(job_key(job_id), "state")
            p.zscore(JOBS_INDEX, job_id)
        got = p.execute()
    return [
        (job_id, float(score))
        for job_id, state, score in zip(ids, got[::2], got[1::2], strict=True)
        if state in states and score is not None and float(score) >= low
    ]


def _host_ids(
    r: redis.Redis, key: str, states: frozenset[str], low: float, limit: int
) -> list[str]:
    if not states:
        return [i for i, _ in _newest(r, [key], low, limit)]
    found: list[str] = []
    offset = 0
    while len(found) < limit:
        page = cast(list[str], r.zrevrangebyscore(key, "+inf", low, start=offset, num=HOST_PAGE))
        if not page:
            break
        with r.pipeline(transaction=False) as p:
            for job_id in page:
                p.hget(job_key(job_id), "state")
            page_states = cast(list[str | None], p.execute())
        found += [i for i, s in zip(page, page_states, strict=True) if s in states]
        offset += len(page)
    return found[:limit]


def fetch(
    r: redis.Redis,
    ids: Iterable[str],
    *,
    full: bool = True,
    unreadable: list[str] | None = None,
) -> list[Job | Evacuation]:
    """The records of `ids` in their order, in one round trip; a record gone (expired since
    it was listed) is left out. Without `full`, a job's phases and history are not read
    (a listing shows neither, and validating them is most of its work). With `unreadable`,
    a record drover cannot read is left out too and its one-line reason added there (one
    record written by hand into Redis must not hide every other job from a listing);
    without it, MalformedRecord is raised."""
    ids = list(ids)
    with r.pipeline(transaction=False) as p:
        for job_id in ids:
            p.hgetall(job_key(job_id))
            if full:
                p.hgetall(phases_key(job_id))
                p.lrange(transitions_key(job_id), 0, -1)
                p.hgetall(children_key(job_id))
        got = p.execute()
    step = 4 if full else 1
    records: list[Job | Evacuation] = []
    for n, job_id in enumerate(ids):
        raw, *rest = got[step * n : step * n + step]
        phases, transitions, children = rest if full else ({}, [], {})
        if not raw:
            continue
        try:
            if raw.get("kind") == EVACUATION_KIND:
                records.append(evacuation_from(raw, children))
            else:
                records.append(job_from(job_id, raw, phases, transitions))
        except MalformedRecord as exc:
            if unreadable is None:
                raise
            unreadable.append(str(exc))
    return records
