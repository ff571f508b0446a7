"""The waiting line, one lane per source -> destination (and evacuation): Redis's side.

Every waiting job sits in its lane (a sorted set, oldest first). A non-empty lane is in one
of two indexes: ready (its head has not been tried since the head changed) or blocked on the
gate that last refused its head. The scripts here keep that true in the same atomic step as
the change that moves it (a job lined up, admitted, or dropped), so an admission pass need
read only the ready lanes and those blocked on a gate that has room now: its cost follows
what can move, not how long the line is. A lost step (a crash between two calls of a pass)
leaves a lane where it was; the rare safety pass (jobs/admission.py) looks at every lane's
head and puts a lane found in no index back as ready.

Which lane a job belongs in is never taken from here on trust: admission derives it again
from the job's spec, and its gates from the registry.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import redis

from jobs.keys import (
    BLOCKED_PREFIX,
    BLOCKING_GATES,
    CLUSTER_GATE,
    JOB_PREFIX,
    LANE_FIELD,
    LANE_PREFIX,
    LANES,
    LANES_BLOCKED_BY,
    LANES_READY,
    SAFETY_PASS,
    blocked_key,
    evacuation_gate,
    inbound_gate,
    outbound_gate,
)
from jobs.lane_scripts import (
    ADMIT_LUA,
    DROP_LUA,
    EVERY_HEAD_LUA,
    LINE_UP_LUA,
    PRUNE_LUA,
)
from jobs.lease import FREE_UNLESS_HELD_LUA

MS_PER_S = 1000
# Claim the safety pass: KEYS[1] its key, ARGV[1] the claimant, ARGV[2] the time to live in
# ms. A claim with no time to live (set by hand) would stop every safety pass for good.
_CLAIM_LUA = (
    FREE_UNLESS_HELD_LUA
    + """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
)
LANE_PAGE = 32  # lanes read at a time from one index by a pass
_WHOLE = re.compile(r"[0-9]{1,9}")  # a limit as the admit script writes it; int() takes more


def _limit(raw: str) -> int | None:
    if not _WHOLE.fullmatch(raw):
        return None
    return int(raw) or None


@dataclass(frozen=True)
class LaneHead:
    lane: str
    head: str  # the oldest job in it
    created: float  # the head's creation time
    blocked_on: str  # the gate the lane is blocked on, "" for none


def lane_gates(lane: str) -> set[str]:
    """The gates every job of `lane` falls under, from its key (host names hold no ':')."""
    src, dst, *parent = lane.removeprefix(LANE_PREFIX).split(":")
    gates = {outbound_gate(src), inbound_gate(dst), CLUSTER_GATE}
    return gates | {evacuation_gate(p) for p in parent}


class Lanes:
    """The lanes and their indexes; every change goes through one script."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._line_up = client.register_script(LINE_UP_LUA)
        self._drop = client.register_script(DROP_LUA)
        self.admit_script = client.register_script(ADMIT_LUA)
        self._every_head = client.register_script(EVERY_HEAD_LUA)
        self._prune = client.register_script(PRUNE_LUA)
        self._claim = client.register_script(_CLAIM_LUA)

    @staticmethod
    def index_keys(lane: str, job_key: str) -> list[str]:
        """KEYS[1..6] of every script here."""
        return [lane, job_key, LANES, LANES_READY, LANES_BLOCKED_BY, BLOCKING_GATES]

    def line_up(self, job_id: str, job_key: str, lane: str, score: float) -> None:
        """Put a job at its place in `lane` (by creation time) and record the lane on it."""
        self._line_up(
            keys=self.index_keys(lane, job_key), args=[job_id, score, LANE_FIELD, BLOCKED_PREFIX]
        )

    def drop(self, job_id: str, job_key: str, lane: str) -> str:
        """Take `job_id` out of `lane`; returns the lane's new head ("" when it is empty)."""
        head = self._drop(keys=self.index_keys(lane, job_key), args=[job_id, BLOCKED_PREFIX])
        return str(head)

    def head(self, lane: str) -> str | None:
        found = cast(list[str], self.r.zrange(lane, 0, 0))
        return found[0] if found else None

    def claim_safety_pass(self, holder: str, every_s: float) -> bool:
        """True for one caller per `every_s` in the whole fleet: the safety pass is the same
        work whoever does it, so two hundred workers need not all do it."""
        claimed = self._claim(keys=[SAFETY_PASS], args=[holder, int(every_s * MS_PER_S)])
        return bool(claimed)

    def blocking_gates(self) -> dict[str, int | None]:
        """Every gate some lane is blocked on -> its limit when it refused; None for a limit
        the admit script cannot have written (not a whole number of at least one: every
        limit is), which anyone with the Redis password can put there."""
        raw = cast(dict[str, str], self.r.hgetall(BLOCKING_GATES))
        return {gate: _limit(value) for gate, value in raw.items()}

    def holders_count(self, gates: list[str]) -> list[int]:
        with self.r.pipeline(transaction=False) as p:
            for gate in gates:
                p.scard(gate)
            return [int(n) for n in p.execute()]

    def oldest_first(self, gates: list[str]) -> Iterator[tuple[str, float]]:
        """The ready lanes and those blocked on any of `gates`, oldest head first, read a
        page at a time (a pass usually stops after a few lanes, however many wait): the first
        page of each in one round trip, the next ones only if the pass gets that far.

        Pages follow creation time, not position, so lanes leaving a set while the pass runs
        cannot make it skip others (a tie in time at a page's edge waits for the next pass).
        """
        keys = [LANES_READY, *(blocked_key(gate) for gate in gates)]
        with self.r.pipeline(transaction=False) as p:
            for key in keys:
                p.zrange(key, 0, LANE_PAGE - 1, withscores=True)
            firsts: list[list[tuple[str, float]]] = p.execute()
        return heapq.merge(
            *(self._pages(key, first) for key, first in zip(keys, firsts, strict=True)),
            key=lambda row: row[1],
        )

    def _pages(self, key: str, rows: list[tuple[str, float]]) -> Iterator[tuple[str, float]]:
        while rows:
            yield from rows
            if len(rows) < LANE_PAGE:
                return
            rows = cast(
                list[tuple[str, float]],
                self.r.zrangebyscore(
                    key, f"({rows[-1][1]}", "+inf", start=0, num=LANE_PAGE, withscores=True
                ),
            )

    def every_head(self) -> list[LaneHead]:
        """Every non-empty lane's head, oldest first, in one call: a lane found in no index
        is put back as ready (a pass cut short), an empty one leaves every index."""
        flat = cast(
            list[str],
            self._every_head(keys=self.index_keys("", JOB_PREFIX)[2:], args=[BLOCKED_PREFIX]),
        )
        found = [
            LaneHead(flat[i], flat[i + 1], float(flat[i + 2]), flat[i + 3])
            for i in range(0, len(flat), 4)
        ]
        return sorted(found, key=lambda row: row.created)

    def prune(self, gates: list[str], terminal: list[str]) -> None:
        """Take out of `gates` the slots of jobs that ended or vanished."""
        if gates:
            self._prune(keys=gates, args=[JOB_PREFIX, *terminal])

    def forget(self, lane: str) -> None:
        """A lane found empty (its jobs ended while waiting) leaves every index, if still
        empty; one with a job again is put back as ready."""
        self.drop("", JOB_PREFIX, lane)

    def members(self) -> list[str]:
        """Every job id in every lane (for tests and people; the passes never read this)."""
        with self.r.pipeline(transaction=False) as p:
            for lane in sorted(cast(set[str], self.r.smembers(LANES))):
                p.zrange(lane, 0, -1)
            return [job_id for ids in p.execute() for job_id in ids]
