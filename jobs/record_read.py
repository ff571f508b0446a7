"""Records as Redis returns them, read into models: for the store and for `drover jobs`.

Apart from jobs/records.py and jobs/evacuation.py (which import the whole store, request
signing and its cryptography) so that listing jobs loads only the models it shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError

from config.policy_model import EffectivePolicy
from jobs.keys import POSTCOPY_FIELD
from jobs.model import Job, PhaseRecord, Transition
from jobs.record import (
    Handoff,
    MalformedRecord,
    Result,
    SourceFacts,
    first_complaint,
    parse_field,
)
from jobs.record_marks import when
from jobs.request_fields import REQUEST_FIELD
from jobs.spec import MigrationSpec
from jobs.states import EvacuationState, JobState

if TYPE_CHECKING:
    from jobs.evacuation_model import Evacuation

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# What reading a field drover did not write can raise: a model or a state refusing it, a
# date or number that does not parse, a field missing, a JSON value of the wrong type.
READ_ERRORS = (ValueError, KeyError, TypeError)


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
