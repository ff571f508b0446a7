"""Admission: a migration starts only when every concurrency limit it falls under has room.

A job falls under up to four gates: its source's outbound limit, its destination's inbound
limit (both from the registry), the cluster-wide limit, and its evacuation's `--max-parallel`.
A gate is a Redis set of the ids of the jobs holding a slot in it. One Lua script checks every
gate and takes a slot in all of them at once, or in none; the store's terminal transition
gives the slots back in the same atomic step that ends the job (jobs/transition.py). So a slot is
held for exactly as long as its job lives: through a worker crash and its recovery, and never
longer (a job that ended without giving a slot back is pruned by the next admission).

Jobs not yet admitted wait in lanes, one per source -> destination (and evacuation), oldest
first (jobs/lanes.py). Every job of a lane falls under the same gates, so a lane moves only
from its head, and a refused head means the rest of the lane waits too; a job blocked on one
host never holds up a job between two other hosts, which is in another lane. The passes:

- `admit_lane`: one lane (a producer after submitting: its own job's lane, not the fleet's);
- `pass_`: the ready lanes and those blocked on a gate that has room now (every worker on a
  short tick and whenever a job ends); its cost follows the gates and the lanes that can
  move, not the length of the line; `admit_after_free` is the same for gates the caller names;
- `safety_pass`: every lane's head, rarely, so that no lost step (a crash in
  the middle of a pass) can strand a lane; it also moves jobs from the one-line waiting set
  of earlier versions into their lanes.

Every pass tries heads oldest first and stops as soon as the cluster-wide gate refuses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import redis

from config.events import get_logger
from jobs.admission_head import (
    ADMISSION_HOST,
    ADMITTED,
    BAD_SPEC,
    REFUSED,
    TERMINAL_NAMES,
    Gate,
    HeadTrial,
    Send,
    gates_for,
    lane_of,
)
from jobs.keys import (
    BLOCKING_GATES,
    CLUSTER_GATE,
    WAITING,
    evacuation_gate,
    inbound_gate,
    job_key,
    outbound_gate,
)
from jobs.lanes import Lanes, lane_gates
from jobs.request_signing import RequestVerifier
from jobs.slot_holders import prune_unsigned
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = [
    "CLUSTER_GATE",
    "WAITING",
    "Gate",
    "Send",
    "evacuation_gate",
    "gates_for",
    "inbound_gate",
    "lane_of",
    "outbound_gate",
]


# A gate of a host no longer in the registry: treated as having room, so its lanes are tried
# and their jobs end `failed` with the reason rather than wait for ever.
_UNBOUNDED = 1 << 30


class Admission:
    """Admits waiting jobs; `send` starts an admitted job's chain (Celery stays outside)."""

    def __init__(self, store: JobStore, verifier: RequestVerifier | None = None) -> None:
        """With a `verifier` (signing on), a job starts only if a trusted key signed its
        request; anything else ends `failed` here and nothing is sent."""
        self.store = store
        self.verifier = verifier
        self.lanes = Lanes(store.r)
        self._heads = HeadTrial(store, self.lanes, verifier)

    def wait(self, job_id: str, spec: MigrationSpec, parent: str | None, created: float) -> str:
        """Put a new job in its lane; returns the lane (for its submitter's `admit_lane`)."""
        lane = lane_of(spec, parent)
        self.lanes.line_up(job_id, job_key(job_id), lane, created)
        return lane

    def waiting_ids(self) -> list[str]:
        """Every job in line (reads every lane: for tests and people, not for the passes)."""
        return self.lanes.members()

    # --- the passes ---------------------------------------------------------------------------

    def admit_lane(self, settings: Settings, send: Send, lane: str) -> list[str]:
        """Admit, oldest first, what fits now from one lane (an error is the caller's: there
        is no other lane here to go on with)."""
        return self._run(settings, send, [(lane, 0.0)], {}, alone=True)

    def admit_after_free(self, settings: Settings, send: Send, freed_gates: list[str]) -> list[str]:
        """Admit from the ready lanes and those blocked on `freed_gates` (gates that have room
        now), oldest head first."""
        return self._run(settings, send, self.lanes.oldest_first(freed_gates), {})

    def pass_(self, settings: Settings, send: Send) -> list[str]:
        """Admit whatever can have become admissible: the ready lanes and those blocked on a
        gate with room now. A few round trips whatever the length of the line."""
        return self.admit_after_free(settings, send, self.gates_with_room(settings))

    def gates_with_room(self, settings: Settings) -> list[str]:
        """The gates some lane is blocked on that have room now (limits from the registry;
        an evacuation's from when it refused)."""
        return self._blocking_gates(settings)[0]

    def _blocking_gates(self, settings: Settings) -> tuple[list[str], set[str]]:
        """The gates some lane is blocked on: those with room now, and those full.

        A gate whose recorded limit cannot be read counts as having room: its lanes are
        tried, and the admit script decides with the limits of the registry and the job's
        signed request (never this record), writing a readable limit back if it refuses.
        Read the other way, its lanes would wait for ever; read as an error, no lane would
        be admitted at all.
        """
        blocking = self.lanes.blocking_gates()
        gates = sorted(blocking)
        counts = self.lanes.holders_count(gates)
        unreadable = [gate for gate in gates if blocking[gate] is None]
        if unreadable:
            get_logger().warning(  # looked up here: producers import this, never log
                "record.unreadable",
                key=BLOCKING_GATES,
                field=" ".join(unreadable),
                reason="not a limit drover writes; its lanes are tried against the real limits",
            )
        room = [
            gate
            for gate, held in zip(gates, counts, strict=True)
            if (limit := blocking[gate]) is None or held < _limit_now(settings, gate, limit)
        ]
        return room, set(gates) - set(room)

    def safety_pass(self, settings: Settings, send: Send) -> list[str]:
        """Every lane's head, oldest first, until the cluster-wide gate refuses; lanes found
        in no index are put back as ready, and jobs in the old one-line set move to lanes.

        A head is not tried when its lane is blocked on one of its own gates that is full
        now (its slots' holders checked first): it cannot start, whatever else is true.
        """
        self._drain_legacy()
        blocking = sorted(self.lanes.blocking_gates())
        self.lanes.prune(blocking, TERMINAL_NAMES)
        prune_unsigned(self.store, self.verifier, blocking)
        heads = self.lanes.every_head()
        full = self._blocking_gates(settings)[1]
        heads = [
            h for h in heads if not (h.blocked_on in full and h.blocked_on in lane_gates(h.lane))
        ]
        return self._run(
            settings,
            send,
            [(h.lane, h.created) for h in heads],
            {h.lane: h.head for h in heads},
        )

    def _run(
        self,
        settings: Settings,
        send: Send,
        lanes: Iterable[tuple[str, float]],
        heads: dict[str, str],
        *,
        alone: bool = False,
    ) -> list[str]:
        """Each lane (once, in the order given: oldest head first) from its head until a
        refusal; all stop once the cluster-wide gate refuses.

        Each lane on its own: an error in one (a key of it that is not what drover writes,
        a bug) is logged and the pass goes on with the others; an outage of Redis is the
        caller's, as is any error when `alone`.
        """
        admitted: list[str] = []
        seen: set[str] = set()
        for lane, _ in lanes:
            if lane in seen:
                continue
            seen.add(lane)
            try:
                if self._lane(settings, send, lane, heads.get(lane), admitted):
                    return admitted
            except (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError):
                raise
            except Exception as exc:
                if alone:
                    raise
                _lane_failed(lane, exc)
            else:
                _LANES_FAILED.pop(lane, None)
        return admitted

    def _lane(
        self, settings: Settings, send: Send, lane: str, head: str | None, admitted: list[str]
    ) -> bool:
        """One lane from its head until a refusal; True when the cluster-wide gate refused."""
        head = head or self.lanes.head(lane)
        if head is None:
            self.lanes.forget(lane)  # emptied by transitions: out of the indexes
            return False
        while head:
            trial = self._heads.attempt(lane, head, settings, send)
            if trial.code == REFUSED:
                return trial.gate == CLUSTER_GATE
            if trial.code == ADMITTED:
                admitted.append(head)
            head = trial.next_head
        return False

    def _drain_legacy(self) -> None:
        """Jobs in the waiting set of versions before lanes go to their lanes."""
        old = cast(list[tuple[str, float]], self.store.r.zrange(WAITING, 0, -1, withscores=True))
        for job_id, created in old:
            try:
                self._drain_one(job_id, created)
            except redis.ResponseError as exc:  # a key of it drover did not write: skipped
                get_logger().warning(
                    "record.unreadable", key=job_key(job_id), field="", reason=str(exc)
                )
            self.store.r.zrem(WAITING, job_id)

    def _drain_one(self, job_id: str, created: float) -> None:
        raw, parent = cast(
            list[str | None], self.store.r.hmget(job_key(job_id), ["spec", "parent"])
        )
        try:
            spec = MigrationSpec.model_validate_json(raw) if raw else None
        except ValueError:
            self.store.transition(job_id, JobState.FAILED, host=ADMISSION_HOST, reason=BAD_SPEC)
            spec = None
        if spec is not None:
            self.wait(job_id, spec, parent, created)

    def holders(self, gate: str) -> set[str]:
        return cast(set[str], self.store.r.smembers(gate))


# Lane -> the error last logged for it (in this process): a lane that fails the same way at
# every pass is logged once, not at every tick. Bounded: lane keys are anyone's to write.
_LANES_FAILED: dict[str, str] = {}
_LANES_FAILED_MAX = 1024


def _lane_failed(lane: str, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"
    if _LANES_FAILED.get(lane) == error:
        return
    if len(_LANES_FAILED) >= _LANES_FAILED_MAX:
        _LANES_FAILED.clear()
    _LANES_FAILED[lane] = error
    log = get_logger()  # looked up here: producers import this module
    log.warning("admission.lane_failed", lane=lane, error=error)


def _limit_now(settings: Settings, gate: str, when_refused: int) -> int:
    """A gate's limit in the registry as it is now (it may have changed since it refused)."""
    if gate == CLUSTER_GATE:
        return settings.cluster.max_migrations
    for prefix, outbound in ((outbound_gate(""), True), (inbound_gate(""), False)):
        if gate.startswith(prefix):
            host = settings.hosts.get(gate.removeprefix(prefix))
            if host is None:
                return _UNBOUNDED
            return host.limits.max_outbound if outbound else host.limits.max_inbound
    return when_refused
