"""The one transition script for migration jobs and evacuations, driven by their state table.

A state change is a compare-and-set in Redis: it happens only from a state allowed to precede
it (jobs/states.py), and the state, its timestamp, its reason and the history entry are
written together. Two workers (or a redelivered message) can therefore never both move a
record on. What a state means beyond that comes from the kind's `StateTable` as arguments, so
the script itself names no state and no key: nothing is patched into it.

Ending a record gives back, in the same step, its active mark, its place in the waiting line,
its admission slots (the `gates` it was admitted through) and its memory reservations: no
crash can leave a slot or a reservation held by a job that has ended. Leaving the stall state
clears the stall's reason and origin (the history keeps them). Entering the success state
drops a pending abort that came too late to act on (libvirt cannot abort post-copy).

With a `Retention` (jobs/retention.py), a terminal transition also runs its end script in
the same MULTI: the record and all its keys get their time to live, its leases are given
back and it is filed in the listing indexes, atomically with the state change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis

from jobs.connection import queue_script
from jobs.keys import (
    BLOCKED_PREFIX,
    BLOCKING_GATES,
    GATES_FIELD,
    LANE_FIELD,
    LANES,
    LANES_BLOCKED_BY,
    LANES_READY,
    RESERVATIONS_PREFIX,
    RESERVATIONS_SUFFIX,
)
from jobs.states import StateTable

if TYPE_CHECKING:
    from jobs.retention import Retention

# KEYS[1] record hash, KEYS[2] history list, KEYS[3] active set, KEYS[4] waiting line,
# KEYS[5..8] the lanes' indexes: every lane, ready lanes, lane -> blocking gate, gate -> limit.
# ARGV[1] target, ARGV[2] timestamp, ARGV[3] history entry ("" keeps none), ARGV[4] reason
# ("" for none), ARGV[5] record id, ARGV[6] "1" if the target is terminal, ARGV[7] the stall
# state ("" if the kind has none), ARGV[8] "1" if the target drops a pending abort, ARGV[9]
# and ARGV[10] the reservations key around a host name, ARGV[11] the gates field,
# ARGV[12] the lane field (jobs/lanes.py), ARGV[13] the blocked-lanes key prefix, ARGV[14..]
# the allowed source states. A lane its end leaves empty leaves the indexes with it.
# Returns {1, previous} when moved, {2, current} when already there, {0, current} if refused.
# Redis does not undo a script's writes when a command in it fails, and the state is written
# first: every write after it skips a key of another type than drover writes (anyone with the
# Redis password can SET one), so the record never ends half-done: active, lanes and slots
# kept, bookings held for ever, the caller told of an error for a state already changed.
TRANSITION_LUA = """
local function kind(key) return redis.call('TYPE', key)['ok'] end
local function is(key, want) return kind(key) == want end
local function empty(key)  -- holds no lane nor job: a key that is no sorted set holds none
  return not is(key, 'zset') or redis.call('ZCARD', key) == 0
end
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if cur == ARGV[1] then return {2, cur} end
local stall = ARGV[7]
for i = 14, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    if stall ~= '' and cur == stall then redis.call('HDEL', KEYS[1], 'reason', 'stalled_from') end
    if ARGV[8] == '1' then redis.call('HDEL', KEYS[1], 'abort_requested') end
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
    if stall ~= '' and ARGV[1] == stall then redis.call('HSET', KEYS[1], 'stalled_from', cur) end
    if ARGV[3] ~= '' and (is(KEYS[2], 'list') or is(KEYS[2], 'none')) then
      redis.call('RPUSH', KEYS[2], ARGV[3])
    end
    if ARGV[6] == '1' then
      redis.call('HDEL', KEYS[1], 'waiting_for')  -- an ended job waits for nothing
      if is(KEYS[3], 'set') then redis.call('SREM', KEYS[3], ARGV[5]) end
      if is(KEYS[4], 'zset') then redis.call('ZREM', KEYS[4], ARGV[5]) end
      local lane = redis.call('HGET', KEYS[1], ARGV[12])
      if lane then
        if is(lane, 'zset') then redis.call('ZREM', lane, ARGV[5]) end
        if empty(lane) then
          if is(KEYS[5], 'set') then redis.call('SREM', KEYS[5], lane) end
          if is(KEYS[6], 'zset') then redis.call('ZREM', KEYS[6], lane) end
          local gate = is(KEYS[7], 'hash') and redis.call('HGET', KEYS[7], lane)
          if gate then
            local blocked = ARGV[13] .. gate
            redis.call('HDEL', KEYS[7], lane)
            if is(blocked, 'zset') then redis.call('ZREM', blocked, lane) end
            if empty(blocked) and is(KEYS[8], 'hash') then redis.call('HDEL', KEYS[8], gate) end
          end
        end
      end
      local gates = redis.call('HGET', KEYS[1], ARGV[11])
      if gates then
        for gate in string.gmatch(gates, '%S+') do
          if is(gate, 'set') then redis.call('SREM', gate, ARGV[5]) end
        end
      end
      local raw = redis.call('HGET', KEYS[1], 'spec')
      local ok, spec = pcall(cjson.decode, raw or '')  -- a spec that is not JSON ends too
      if ok and type(spec) == 'table' then
        for _, host in ipairs({spec['src'], spec['dst']}) do
          local booked = type(host) == 'string' and ARGV[9] .. host .. ARGV[10]
          if booked and is(booked, 'hash') then redis.call('HDEL', booked, ARGV[5]) end
        end
      end
    end
    return {1, cur}
  end
end
return {0, cur}
"""

MOVED, ALREADY_THERE = 1, 2
LANE_INDEXES = (LANES, LANES_READY, LANES_BLOCKED_BY, BLOCKING_GATES)


@dataclass(frozen=True)
class Keys:
    """The keys one transition touches."""

    record: str
    history: str
    active: str
    waiting: str


@dataclass(frozen=True)
class Outcome:
    moved: bool
    previous: str | None  # the state before (moved) or now (not moved); None: no such record


class Transitioner:
    """Runs the transition script for one kind of record (its `StateTable`)."""

    def __init__(
        self, client: redis.Redis, table: StateTable, retention: Retention | None = None
    ) -> None:
        self.table = table
        self.r = client
        self.retention = retention
        self._script = client.register_script(TRANSITION_LUA)

    def run(
        self,
        keys: Keys,
        record_id: str,
        target: str,
        at: str,
        *,
        entry: str = "",
        reason: str | None = None,
        only_from: str | None = None,
        with_writes: Callable[[redis.client.Pipeline], None] | None = None,
    ) -> Outcome:
        """Move the record to `target` if its state allows it (narrowed to `only_from`).
        `with_writes` stacks writes made in the same MULTI, before the transition, whatever
        its outcome (a phase's end and the state it enters: both or neither)."""
        args = self._args(record_id, target, at, entry, reason, only_from)
        script_keys = [keys.record, keys.history, keys.active, keys.waiting, *LANE_INDEXES]
        ending = self.retention is not None and target in self.table.terminal
        if not ending and with_writes is None:
            raw = self._script(keys=script_keys, args=args)
        else:
            with self.r.pipeline(transaction=True) as p:
                if with_writes is not None:
                    with_writes(p)
                at_script = len(p)
                queue_script(p, self._script, script_keys, args)
                if self.retention is not None and ending:
                    self.retention.queue_end(p, record_id, time.time(), self.table.terminal)
                raw = p.execute()[at_script]
        moved, previous = cast(list[object], raw)
        return Outcome(moved == MOVED, str(previous) if previous else None)

    def queue(
        self,
        pipe: redis.client.Pipeline,
        keys: Keys,
        record_id: str,
        target: str,
        at: str,
        *,
        entry: str = "",
    ) -> None:
        """Stack the transition (and, ending, the retention) on `pipe` without reading the
        outcome: for filling a store with history in bulk (bench/history.py)."""
        args = self._args(record_id, target, at, entry, None, None)
        script_keys = [keys.record, keys.history, keys.active, keys.waiting, *LANE_INDEXES]
        queue_script(pipe, self._script, script_keys, args)
        if self.retention is not None and target in self.table.terminal:
            self.retention.queue_end(pipe, record_id, time.time(), self.table.terminal)

    def _args(
        self,
        record_id: str,
        target: str,
        at: str,
        entry: str,
        reason: str | None,
        only_from: str | None,
    ) -> list[str]:
        table = self.table
        allowed = table.sources(target)
        if only_from is not None:
            allowed = allowed & {only_from}
        return [
            target,
            at,
            entry,
            reason or "",
            record_id,
            "1" if target in table.terminal else "0",
            table.stall,
            "1" if table.success and target == table.success else "0",
            RESERVATIONS_PREFIX,
            RESERVATIONS_SUFFIX,
            GATES_FIELD,
            LANE_FIELD,
            BLOCKED_PREFIX,
            *sorted(allowed),
        ]
