"""The operator's control of a running migration: `drover tune` and `drover force-complete`.

A task message carries only a job id (config/security.py), so a tune request's numbers travel
beside it in Redis: the producer puts a `TuneRequest` in the job's tune hash (jobs/keys.py
`tune_key`) under the id of the task it sends for it; the source worker takes its task's own
and validates it again against the same bounds (config/policy_model.py) before libvirt sees a
number.

With signing on, the request is signed where it is made, as a job's is (jobs/request_signing.py
kind `tune`, its task's id inside the payload), and the worker takes only a request a trusted
key signed for this job and this task: the numbers in Redis had been anyone's with its
password (attacker probe: an operator's `--bandwidth 2` became an uncapped bandwidth and a
60 s pause allowed, "asked by" a name of the attacker's choosing, and libvirt applied it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.policy_model import MAX_BANDWIDTH_MIB, MAX_DOWNTIME_MS
from jobs.keys import tune_key
from jobs.model import Job
from jobs.request_signing import (
    REQUEST_FIELD,
    RequestRefused,
    RequestSigner,
    RequestVerifier,
    signed_record,
)
from jobs.states import JobState

TUNE_KIND = "tune"  # what a signed tune request is (jobs/request_signing.py)

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


class SignedTune(TuneRequest):
    """What is signed: the request, and the task it was sent with (a signed request put
    under another task's id is refused)."""

    request_id: str


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
    r: redis.Redis,
    job_id: str,
    request_id: str,
    request: TuneRequest,
    ttl_s: float,
    signer: RequestSigner | None = None,
) -> None:
    """Put a request beside its task (`request_id`, the task's id), for the source worker
    (kept no longer than a task message); signed with `signer`'s key when signing is on."""
    key = tune_key(job_id)
    signed = signed_record(
        signer,
        kind=TUNE_KIND,
        job_id=job_id,
        spec=SignedTune(**request.model_dump(), request_id=request_id),
        origin=request.by,
        at=datetime.now(UTC),
    )
    with r.pipeline(transaction=True) as p:
        p.hset(key, request_id, signed.get(REQUEST_FIELD) or request.model_dump_json())
        p.expire(key, max(1, round(ttl_s)))
        p.execute()


def pop_tune(
    r: redis.Redis, job_id: str, request_id: str, verifier: RequestVerifier | None = None
) -> TuneRequest | None:
    """The request of the task `request_id` (None when there is none), taken and validated
    again here: BadControlRequest when what Redis holds is not a valid request, or (with
    signing on: a `verifier`) not one a trusted key signed for this job and this task.

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
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return _signed_tune(verifier, text, job_id, request_id) if verifier else _tune_of(text)


def _tune_of(raw: str) -> TuneRequest:
    try:
        return TuneRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _not_valid(exc) from None


def _not_valid(exc: ValidationError) -> BadControlRequest:
    """The first thing wrong with a request read back, in one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the request"
    return BadControlRequest(f"the tune request is not valid: {where}: {err['msg']}")


def _signed_tune(verifier: RequestVerifier, raw: str, job_id: str, request_id: str) -> TuneRequest:
    """The request a trusted key signed for this job's task `request_id`, checked again."""
    try:
        request = verifier.verify(raw, job_id)
    except RequestRefused as exc:
        raise BadControlRequest(f"the tune request is refused: {exc}") from None
    if request.kind != TUNE_KIND:
        raise BadControlRequest(f"the tune request is refused: it is a signed {request.kind}")
    try:
        signed = SignedTune.model_validate(request.spec)
    except ValidationError as exc:
        raise _not_valid(exc) from None
    if signed.request_id != request_id:
        raise BadControlRequest(
            "the tune request is refused: it was signed for another request "
            f"({signed.request_id[:32]}), not this one"
        )
    return TuneRequest.model_validate(signed.model_dump(exclude={"request_id"}))


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
