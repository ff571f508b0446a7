"""Trying one lane's head: everything admission checks before a job may take its slots.

The job's record is read and judged here, never the lane it was found in: its spec must be
valid, its signed request verified (jobs/request_signing.py), the lane must be the one its
spec and evacuation name, and its gates are derived from the registry as it is now. A job
failing any of these ends `failed` with the reason and leaves the line; one that fits takes a
slot in every gate at once (jobs/lanes.py) and is sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from config.events import get_logger
from jobs.evacuation_model import MAX_PARALLEL
from jobs.keys import (
    BLOCKED_PREFIX,
    CLUSTER_GATE,
    GATES_FIELD,
    evacuation_gate,
    events_key,
    inbound_gate,
    job_key,
    lane_key,
    outbound_gate,
)
from jobs.lanes import Lanes
from jobs.model import migration_event
from jobs.request_signing import (
    MIGRATION_KIND,
    REQUEST_FIELD,
    SECURITY_REASON,
    RequestRefused,
    RequestVerifier,
    check_record,
)
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState
from jobs.store import JobStore, now

if TYPE_CHECKING:
    from config.settings import Settings

ADMITTED, REFUSED, GONE, ALREADY = 1, 0, -1, 2
ADMISSION_HOST = "admission"  # the `host` of the events and transitions admission writes
BAD_SPEC = "refused: the job record's spec is not valid"
BAD_PARENT_LIMIT = "refused: the job record's parent_limit is not an evacuation's limit"
_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() also takes " 5", "1_0", "²"
TERMINAL_NAMES = sorted(s.value for s in TERMINAL)


@dataclass(frozen=True)
class Gate:
    key: str
    limit: int
    label: str  # for people: "lab1 outbound (limit 2)"


def gate_names(
    spec: MigrationSpec, parent_limit: int | None = None, parent: str = ""
) -> list[tuple[str, str]]:
    """(key, label) of every gate a migration falls under: from its spec and evacuation
    alone, so that they hold whatever the registry says now."""
    names = [
        (outbound_gate(spec.src), f"{spec.src} outbound"),
        (inbound_gate(spec.dst), f"{spec.dst} inbound"),
        (CLUSTER_GATE, "cluster-wide"),
    ]
    if parent and parent_limit is not None:
        names.append((evacuation_gate(parent), f"evacuation {parent}"))
    return names


def gates_for(
    spec: MigrationSpec, settings: Settings, parent_limit: int | None = None, parent: str = ""
) -> list[Gate]:
    """Every limit a migration falls under, read from the registry as it is now."""
    src, dst = settings.host(spec.src).limits, settings.host(spec.dst).limits
    names = gate_names(spec, parent_limit, parent)
    limits = [src.max_outbound, dst.max_inbound, settings.cluster.max_migrations, parent_limit]
    return [
        Gate(key, limit or 0, label)
        for (key, label), limit in zip(names, limits[: len(names)], strict=True)
    ]


@dataclass(frozen=True)
class Slots:
    """What `slots_of` read in one round trip: the job's state, and the labels of the gates
    it holds no slot in."""

    state: str | None
    missing: list[str]


def slots_of(
    r: redis.Redis, job_id: str, spec: MigrationSpec, parent: str | None, limit: int | None
) -> Slots:
    """Whether `job_id` holds its slot in every gate it falls under (one pipeline).

    Only the admit script takes slots, in the same step as it writes `admitted`; that field
    alone is anyone's to write with the Redis password, so it proves nothing. A gate key that
    is no set (written by hand) holds no slot.
    """
    names = gate_names(spec, limit, parent or "")
    with r.pipeline(transaction=False) as p:
        p.hget(job_key(job_id), "state")
        for key, _ in names:
            p.sismember(key, job_id)
        state, *held = p.execute(raise_on_error=False)
    missing = [label for (_, label), h in zip(names, held, strict=True) if h not in (1, True)]
    return Slots(state if isinstance(state, str) else None, missing)


def retake_slots(
    r: redis.Redis, job_id: str, spec: MigrationSpec, parent: str | None, limit: int | None
) -> None:
    """Put a running job back in every gate it falls under, after its slots went (removed by
    hand, or pruned while its record was written ended): it runs, so it counts, even past a
    limit reached meanwhile. A gate key that is no set is left as it is; should the job end
    meanwhile, the next admission prunes its slot as any ended job's."""
    with r.pipeline(transaction=False) as p:
        for key, _ in gate_names(spec, limit, parent or ""):
            p.sadd(key, job_id)
        p.execute(raise_on_error=False)


def parent_limit_of(raw: str | None) -> int | None:
    """A child's `--max-parallel` as its record holds it (None: no limit); ValueError for
    what no evacuation can have, which would otherwise fail the whole admission pass."""
    if not raw:
        return None
    if not _WHOLE.fullmatch(raw) or not 1 <= int(raw) <= MAX_PARALLEL:
        raise ValueError(raw)
    return int(raw)


def lane_of(spec: MigrationSpec, parent: str | None) -> str:
    """The lane a job belongs in: its source, destination and evacuation."""
    return lane_key(spec.src, spec.dst, parent or None)


Send = Callable[[str, MigrationSpec], None]


@dataclass(frozen=True)
class Trial:
    """What trying a head came to: the code, the refusing gate, the lane's next head."""

    code: int
    gate: str = ""
    next_head: str = ""


class HeadTrial:
    """Tries lane heads, one at a time; `send` starts an admitted job (Celery stays outside)."""

    def __init__(self, store: JobStore, lanes: Lanes, verifier: RequestVerifier | None) -> None:
        self.store = store
        self.lanes = lanes
        self.verifier = verifier

    def attempt(self, lane: str, job_id: str, settings: Settings, send: Send) -> Trial:
        try:
            fields = cast(
                list[str | None],
                self.store.r.hmget(
                    job_key(job_id),
                    ["spec", "parent", "parent_limit", "waiting_for", REQUEST_FIELD],
                ),
            )
        except redis.ResponseError:  # not a hash: no job drover wrote, nothing to fail
            _unreadable(job_key(job_id), "", "not a job record; it leaves its waiting line")
            return self._out(lane, job_id)
        raw_spec, parent, parent_limit, waiting_for, request = fields
        if raw_spec is None:
            return self._out(lane, job_id)
        try:
            spec = MigrationSpec.model_validate_json(raw_spec)
        except ValueError:  # not a job any producer could have written
            self._end(job_id, JobState.FAILED, BAD_SPEC)
            return self._out(lane, job_id)
        try:
            limit = parent_limit_of(parent_limit)
        except ValueError:  # nor this: it must not stop the lanes behind it
            return self._fail(lane, job_id, spec, BAD_PARENT_LIMIT)
        try:
            check_record(
                self.verifier,
                request,
                job_id,
                kind=MIGRATION_KIND,
                spec=spec,
                parent=parent,
                parent_limit=limit,
                max_age_s=settings.tunables.request_max_age,
            )
        except RequestRefused as exc:
            reason = f"{SECURITY_REASON}: {exc}"
            return self._fail(lane, job_id, spec, reason, "security.rejected")
        own = lane_of(spec, parent)
        if lane != own:  # put there by a Redis writer, not by enqueue
            reason = f"refused: the job was found in the waiting line {lane}, not its own {own}"
            return self._fail(lane, job_id, spec, reason)
        try:
            gates = gates_for(spec, settings, limit, parent or "")
        except Exception as exc:  # a host removed from the registry while the job waited
            return self._fail(lane, job_id, spec, f"cannot admit: {exc}")
        result = cast(
            list[Any],
            self.lanes.admit_script(
                keys=[*Lanes.index_keys(lane, job_key(job_id)), *(g.key for g in gates)],
                args=[
                    job_id,
                    now().isoformat(),
                    JobState.QUEUED.value,
                    job_key(""),
                    GATES_FIELD,
                    BLOCKED_PREFIX,
                    len(TERMINAL_NAMES),
                    *TERMINAL_NAMES,
                    *(g.limit for g in gates),
                ],
            ),
        )
        trial = Trial(int(result[0]), str(result[1]), str(result[2]))
        if trial.code == ADMITTED:
            send(job_id, spec)
        elif trial.code == GONE and trial.gate == JobState.QUEUED.value:
            # Its abort was cut short between the flag and the transition: finish it.
            if self._end(job_id, JobState.CANCELLED, "aborted before it started"):
                self._say(
                    job_id, spec, "job.state", JobState.CANCELLED, "aborted before it started"
                )
            return Trial(GONE, "", trial.next_head)
        elif trial.code == REFUSED:
            gate = next(g for g in gates if g.key == trial.gate)
            reason = f"waiting for a slot: {gate.label} limit {gate.limit} reached"
            if reason != waiting_for:  # tell followers once per reason, not once per pass
                self.store.r.hset(job_key(job_id), "waiting_for", reason)
                self._say(job_id, spec, "job.waiting", None, reason)
        return trial

    def _out(self, lane: str, job_id: str) -> Trial:
        return Trial(GONE, "", self.lanes.drop(job_id, job_key(job_id), lane))

    def _fail(
        self, lane: str, job_id: str, spec: MigrationSpec, reason: str, first: str = ""
    ) -> Trial:
        """End a refused head `failed` and take it out of its line, then say so (`first`, an
        event said before the state's). Its events come last, and one its stream cannot take
        is not said: nothing written to the stream may keep a refused job in line."""
        moved = self._end(job_id, JobState.FAILED, reason)
        out = self._out(lane, job_id)
        if first:
            self._say(job_id, spec, first, None, reason)
        if moved:
            self._say(job_id, spec, "job.state", JobState.FAILED, reason)
        return out

    def _end(self, job_id: str, final: JobState, reason: str) -> bool:
        """Move a waiting job to `final`; False if it was not waiting, or if its record cannot
        take the state (a key of it that is not the type drover writes: logged), so that no
        record can keep its head in line."""
        try:
            moved, _ = self.store.transition(
                job_id, final, host=ADMISSION_HOST, reason=reason, only_from=JobState.QUEUED
            )
        except redis.ResponseError as exc:
            _unreadable(job_key(job_id), "state", f"cannot be moved to {final.value} ({exc})")
            return False
        return moved

    def _say(
        self, job_id: str, spec: MigrationSpec, name: str, state: JobState | None, reason: str
    ) -> None:
        """Append an event to the job's stream; a key there that is no stream (written by
        hand) means it cannot be said: logged, never an outage nor a reason to stop."""
        fields: dict[str, str] = {"reason": reason}
        if state is not None:
            fields["state"] = state.value
        event = migration_event(job_id, spec, name, ADMISSION_HOST, **fields)
        try:
            self.store.append_event(job_id, event)
        except redis.ResponseError as exc:
            _unreadable(
                events_key(job_id), name, f"not an event stream; {name} not written ({exc})"
            )


def _unreadable(key: str, field: str, reason: str) -> None:
    log = get_logger()  # looked up here: producers import this module
    log.warning("record.unreadable", key=key, field=field, reason=reason)
