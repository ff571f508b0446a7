"""Records as Redis returns them, read into models: for the store and for `drover jobs`.

Apart from jobs/records.py and jobs/evacuation.py (which import the whole store, request
signing and its cryptography) so that listing jobs loads only the models it shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar, cast

import redis
from pydantic import BaseModel, ValidationError

from config.policy_model import EffectivePolicy
from jobs.keys import POSTCOPY_FIELD
from jobs.model import Job, PhaseRecord, Transition
from jobs.record import (
    Handoff,
    Result,
    SourceFacts,
    first_complaint,
    parse_field,
)
from jobs.record import (
    MalformedRecord as MalformedRecord,
)
from jobs.record_marks import when
from jobs.request_fields import PREPARED_FIELD, REQUEST_FIELD
from jobs.spec import MigrationSpec
from jobs.states import EvacuationState, JobState

if TYPE_CHECKING:
    from jobs.evacuation_model import Evacuation

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# What reading a field drover did not write can raise: a model or a state refusing it, a
# date or number that does not parse, a field missing, a JSON value of the wrong type.
READ_ERRORS = (ValueError, KeyError, TypeError)
# Redis refusing every command, whatever the key: the server's state (a replica, its ACL, its
# memory), not one record's data. With the outages, these end a duty's pass (worker/keeper.py
# says `keeper.redis_unavailable`); any other refusal (WRONGTYPE: a key that holds another
# type than drover writes) is the one record's or the one key's.
SERVER_REFUSALS: tuple[type[redis.RedisError], ...] = (
    redis.ReadOnlyError,
    redis.OutOfMemoryError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.MasterDownError,
)
REDIS_OUTAGES: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    *SERVER_REFUSALS,
)


class KeyUnreadable(redis.ResponseError):
    """A key shared by many records (an index, a set of live ids) that Redis refuses to read
    as the type drover writes there; one line naming the key and what it holds."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def _wrong_type(r: redis.Redis, expected: Mapping[str, str], exc: redis.ResponseError) -> str:
    """Which of `expected`'s keys holds another type ("drover:job:1 is a string, not a
    hash"), asked of Redis after it refused to read one; else Redis's own first line."""
    keys = list(expected)
    with r.pipeline(transaction=False) as p:
        for key in keys:
            p.type(key)
        found = cast(list[str], p.execute())
    for key, kind in zip(keys, found, strict=True):
        if kind not in ("none", expected[key]):
            return f"{key} is a {kind}, not a {expected[key]}"
    return first_line(str(exc))


def first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "?"
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def record_keys_read(r: redis.Redis, record: str, expected: Mapping[str, str]) -> Iterator[None]:
    """Reading one record's keys (`expected`: key -> the type drover writes): Redis refusing
    one (anyone with the password can SET a record's hash to a string) is that record's
    MalformedRecord, skipped like any record drover did not write, never a Redis outage
    that would end a duty's pass over every other record."""
    try:
        yield
    except redis.ResponseError as exc:
        if isinstance(exc, SERVER_REFUSALS):
            raise
        problem = _wrong_type(r, expected, exc)
        raise MalformedRecord(f"{record}: its record cannot be read: {problem}") from None


@contextmanager
def shared_key_read(r: redis.Redis, key: str, expected: str) -> Iterator[None]:
    """Reading a key many records share: Redis refusing it is KeyUnreadable, which names
    the key and the type it holds (a duty says so instead of a Redis outage)."""
    try:
        yield
    except redis.ResponseError as exc:
        if isinstance(exc, SERVER_REFUSALS):
            raise
        raise KeyUnreadable(key, _wrong_type(r, {key: expected}, exc)) from None


def _readable(record: str, read: Callable[[], T]) -> T:
    """`read()`, or MalformedRecord naming the record and its first problem.

    A MalformedRecord is a JobNotFound: whoever walks many records (the keeper's duties,
    recovery, `drover jobs`) skips the one it cannot read, instead of failing on it at every
    pass and never reaching those after it. Anyone with the Redis password can write one.
    """
    try:
        return read()
    except MalformedRecord:
        raise
    except READ_ERRORS as exc:
        raise MalformedRecord(
            f"{record}: its record cannot be read: {first_complaint(exc)}"
        ) from None


def _json(model: type[M], name: str, raw: str) -> M:
    """Field `name` as `model`; a ValueError that says which field, and where in it."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([name, *(str(p) for p in err["loc"])])
        raise ValueError(f"{where}: {err['msg']}") from None


def _in_run_order(raw: dict[str, str]) -> dict[str, PhaseRecord]:
    records = [PhaseRecord.model_validate_json(v) for v in raw.values()]
    return {r.phase: r for r in sorted(records, key=lambda r: r.started)}


def job_from(
    job_id: str, raw: dict[str, str], phases: dict[str, str], transitions: list[str]
) -> Job:
    """A migration job from its hash, phase records and history as Redis returns them;
    MalformedRecord when they are not what drover writes."""
    return _readable(f"job {job_id}", lambda: _job(job_id, raw, phases, transitions))


def _job(job_id: str, raw: dict[str, str], phases: dict[str, str], transitions: list[str]) -> Job:
    stalled_from = raw.get("stalled_from")
    return Job(
        id=raw["id"],
        spec=_json(MigrationSpec, "spec", raw["spec"]),
        state=JobState(raw["state"]),
        created=datetime.fromisoformat(raw["created"]),
        updated=datetime.fromisoformat(raw["updated"]),
        reason=raw.get("reason"),
        stalled_from=JobState(stalled_from) if stalled_from else None,
        abort_requested=raw.get("abort_requested"),
        postcopy_since=when(raw.get(POSTCOPY_FIELD)),
        admitted=when(raw.get("admitted")),
        waiting_for=raw.get("waiting_for"),
        parent=raw.get("parent"),
        parent_limit=int(raw["parent_limit"]) if raw.get("parent_limit") else None,
        request=raw.get(REQUEST_FIELD),
        prepared=raw.get(PREPARED_FIELD),
        facts=parse_field(SourceFacts, job_id, "facts", raw.get("facts")),
        handoff=parse_field(Handoff, job_id, "handoff", raw.get("handoff")) or Handoff(),
        policy=parse_field(EffectivePolicy, job_id, "policy", raw.get("policy")),
        result=parse_field(Result, job_id, "result", raw.get("result")) or Result(),
        phases=_in_run_order(phases),
        transitions=[Transition.model_validate_json(t) for t in transitions],
    )


def evacuation_from(raw: dict[str, str], children: dict[str, str]) -> Evacuation:
    """An evacuation from its hash and children as Redis returns them; MalformedRecord when
    they are not what drover writes (a spec of `{bad`, an unknown state)."""
    return _readable(f"evacuation {raw.get('id')}", lambda: _evacuation(raw, children))


def _evacuation(raw: dict[str, str], children: dict[str, str]) -> Evacuation:
    # Imported here: `drover jobs` reads migrations far more often than evacuations.
    from jobs.evacuation_model import DomainOutcome, Evacuation, EvacuationSpec, Placement

    return Evacuation(
        id=raw["id"],
        spec=_json(EvacuationSpec, "spec", raw["spec"]),
        state=EvacuationState(raw["state"]),
        origin=raw.get("origin", ""),
        created=datetime.fromisoformat(raw["created"]),
        updated=datetime.fromisoformat(raw["updated"]),
        reason=raw.get("reason"),
        abort_requested=raw.get("abort_requested"),
        plan=_parse_list(Placement, raw.get("plan")),
        children=children,
        outcome=_parse_list(DomainOutcome, raw.get("outcome")) or [],
        left_on_host=_parse_strings(raw.get("left_on_host")),
        request=raw.get(REQUEST_FIELD),
    )


def _parse_list(model: type[M], raw: str | None) -> list[M] | None:
    if raw is None:
        return None
    return [model.model_validate(item) for item in json.loads(raw)]


def _parse_strings(raw: str | None) -> list[str]:
    return [s for s in (raw or "").split(",") if s]
