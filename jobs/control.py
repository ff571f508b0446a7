"""The operator's control of a running migration: `drover tune` and `drover force-complete`.

A task message carries only a job id (config/security.py), so a tune request's numbers travel
beside it in Redis: the producer puts a `TuneRequest` in the job's tune hash (jobs/keys.py
`tune_key`) under the id of the task it sends for it; the source worker takes its task's own
and validates it again against the same bounds (config/policy_model.py) before libvirt sees a
number. Whoever can write to Redis can change a request's numbers, never beyond those bounds,
and cannot make a worker act without a (signed) task message.
"""

from __future__ import annotations

from typing import cast

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.policy_model import MAX_BANDWIDTH_MIB, MAX_DOWNTIME_MS
from jobs.keys import tune_key
from jobs.model import Job
from jobs.states import JobState

# What `drover tune` sets, by field, as the CLI spells it.
TUNE_OPTIONS = {
    "bandwidth_mib": "--bandwidth",
    "postcopy_bandwidth_mib": "--postcopy-bandwidth",
    "max_downtime_ms": "--max-downtime",
}


class TuneRequest(BaseModel):
    """New limits for a running migration; the fields left out stay as they are.

    The bounds are the policy's (a tune sets what a policy could have set); a bandwidth of 0
    lifts the cap, as in a policy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bandwidth_mib: int | None = Field(default=None, ge=0, le=MAX_BANDWIDTH_MIB)
    postcopy_bandwidth_mib: int | None = Field(default=None, ge=0, le=MAX_BANDWIDTH_MIB)
    max_downtime_ms: int | None = Field(default=None, ge=1, le=MAX_DOWNTIME_MS)
    by: str = ""  # the producer that asked (for the event)

    @model_validator(mode="after")
    def _something(self) -> TuneRequest:
        if not self.figures():
            raise ValueError(f"give at least one of {', '.join(TUNE_OPTIONS.values())}")
        return self

    def figures(self) -> dict[str, int]:
        """The values this request sets, by field."""
        return {k: v for k in TUNE_OPTIONS if (v := getattr(self, k)) is not None}


class BadControlRequest(ValueError):
    """A tune request that is not valid; the message is one line naming the option."""


def tune_request(**values: object) -> TuneRequest:
    """A checked request, or BadControlRequest naming the option and its bound."""
    try:
        return TuneRequest.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        option = TUNE_OPTIONS.get(field, field)
        value = values.get(field)
        head = f"{option} {value}: " if option else ""
        raise BadControlRequest(f"{head}{err['msg']}".replace("Value error, ", "")) from None


def not_migrating(job: Job, what: str) -> str | None:
    """Why `what` cannot be done to `job` now (it is not migrating), or None."""
    if job.state is JobState.MIGRATING:
        return None
    return f"job {job.id} is {job.state.value}, not migrating: nothing to {what}"


def push_tune(
    r: redis.Redis, job_id: str, request_id: str, request: TuneRequest, ttl_s: float
) -> None:
    """Put a request beside its task (`request_id`, the task's id), for the source worker
    (kept no longer than a task message)."""
    key = tune_key(job_id)
    with r.pipeline(transaction=True) as p:
        p.hset(key, request_id, request.model_dump_json())
        p.expire(key, max(1, round(ttl_s)))
        p.execute()


def pop_tune(r: redis.Redis, job_id: str, request_id: str) -> TuneRequest | None:
    """The request of the task `request_id` (None when there is none), taken and validated
    again here: BadControlRequest when what Redis holds is not a valid request.

    Each task takes its own request: several `drover tune` at once each get the answer to
    what they asked (a probe's six concurrent tunes, taken oldest first, told one caller of
    another's figures)."""
    key = tune_key(job_id)
    try:
        with r.pipeline(transaction=True) as p:
            p.hget(key, request_id)
            p.hdel(key, request_id)
            raw = cast(str | bytes | None, p.execute()[0])
    except redis.ResponseError as exc:  # not a hash: written by hand
        raise BadControlRequest(f"the tune requests cannot be read: {exc}") from None
    if raw is None:
        return None
    try:
        return TuneRequest.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "the request"
        raise BadControlRequest(f"the tune request is not valid: {where}: {err['msg']}") from None


def postcopy_off(job: Job, request: TuneRequest) -> str | None:
    """Why the request's post-copy bandwidth could never be used, or None: the job's effective
    policy, as its source worker recorded it when perform began (jobs/policy_choice.py), does
    not allow post-copy, and a running migration's policy does not change. A convenience
    check before anything is sent; with no policy recorded it is left to the worker."""
    policy = job.policy
    if request.postcopy_bandwidth_mib is None or policy is None or policy.values.allow_postcopy:
        return None
    why = policy.sources.get("allow_postcopy", "its default")
    return (
        f"--postcopy-bandwidth: job {job.id} runs with policy {policy.name}, which does not "
        f"allow post-copy ({why}): the figure would never be used"
    )
