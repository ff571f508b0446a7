"""The fleet in figures, as the exporter reads it at each scrape: counts, never every record.

Why this shape: a scrape must stay cheap on a fleet with 10,000 waiting and 100,000 finished
jobs (issue 14), so each figure is the size of a set or sorted set drover keeps anyway, or is
read from records of which there are few at any time (jobs holding a slot, live evacuations):

- migration jobs by state. Finished: each final state's index (jobs/retention.py), counted
  within the retention as `drover jobs` reads it, less the evacuations filed under the same
  state (`EVACUATIONS_INDEX` tells them apart, ZMSCORE). Live: the active set's size. A live
  job past admission holds a slot in the cluster-wide gate (at most `max_migrations` of
  them) and its state is read by a script in the same MULTI; every other live job is
  queued (in a lane, or between its creation and its lane);
- waiting jobs per gate: the size of each lane (jobs/lanes.py), under the gate that refused
  its head (`LANES_BLOCKED_BY`), or `none` for a lane the next admission pass will try;
  summed inside Redis by one script (2,000 lanes would be 2,000 replies to parse here);
- evacuations by state, and for each one running the guests of its plan not yet moved;
- per registry host, whether its worker's heartbeat is there; hosts in maintenance.

Reads go in MULTI blocks, so the counts read together are of one moment: one block for the
jobs, lines, hosts and the ids of evacuations, a second when there are evacuations, a third
while one runs (its children's states). Anyone with the Redis password can write these keys:
each reply is taken on its own, so a key of the wrong type, a member of `LANES` that is no
lane, a record drover cannot read cost only the figures read from them (left out, never
shown as 0; `Fleet.unreadable` names the part), never the whole fleet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import redis

from jobs.connection import queue_script
from jobs.evacuation_model import EVACUATION_TERMINAL, EvacuationState
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    CLUSTER_GATE,
    DISABLED_HOSTS,
    EVACUATIONS_INDEX,
    LANE_PREFIX,
    LANES,
    LANES_BLOCKED_BY,
    SLOTS_PREFIX,
    WAITING,
    children_key,
    heartbeat_key,
    job_key,
    jobs_by_state_key,
)
from jobs.states import LIVE, TERMINAL, JobState

NO_GATE = "none"  # the `gate` of jobs in lanes no gate has refused yet
JOB_FINAL = tuple(sorted(s.value for s in TERMINAL))
EVACUATION_FINAL = tuple(sorted(s.value for s in EVACUATION_TERMINAL))
# Final states both kinds end in: their index holds jobs and evacuations alike.
SHARED_FINAL = tuple(s for s in JOB_FINAL if s in EVACUATION_FINAL)
ALL_FINAL = tuple(sorted({*JOB_FINAL, *EVACUATION_FINAL}))
_SUCCEEDED = JobState.SUCCEEDED.value
_HELD = {"", *(s.value for s in JobState)}  # a slot holder's state: '' for a record gone

# KEYS[1] every lane, KEYS[2] lane -> the gate refusing its head; ARGV[1] the lane key prefix.
# Returns the members of KEYS[1] skipped (not a lane key, or a key that is not a sorted set),
# then a flat list of gate ('' for none), jobs waiting in the lanes blocked on it. Reads only.
_WAITING_BY_GATE_LUA = """
local counts, order, skipped = {}, {}, 0
for _, lane in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local kind = redis.call('TYPE', lane).ok
  if string.sub(lane, 1, #ARGV[1]) ~= ARGV[1] or (kind ~= 'zset' and kind ~= 'none') then
    skipped = skipped + 1
  else
    local n = redis.call('ZCARD', lane)
    if n > 0 then
      local gate = redis.call('HGET', KEYS[2], lane) or ''
      if not counts[gate] then counts[gate] = 0; order[#order + 1] = gate end
      counts[gate] = counts[gate] + n
    end
  end
end
local out = {skipped}
for _, gate in ipairs(order) do out[#out + 1] = gate; out[#out + 1] = counts[gate] end
return out
"""
# KEYS[1] the cluster-wide gate; ARGV[1] the job key prefix. The state of every job holding a
# slot ('' for a record gone, nil for a key that is not a hash), read in the same MULTI as the
# active set's size. Reads only.
_HOLDER_STATES_LUA = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local kind = redis.call('TYPE', ARGV[1] .. id).ok
  if kind == 'hash' then out[#out + 1] = redis.call('HGET', ARGV[1] .. id, 'state') or ''
  else out[#out + 1] = (kind == 'none') and '' or false end
end
return out
"""


def gate_label(gate: str) -> str:
    """A gate's key for people: `cluster`, `out:kvm1`, `in:kvm2`, `evacuation:<id>`."""
    return gate.removeprefix(SLOTS_PREFIX)


@dataclass(frozen=True)
class GuestsLeft:
    evacuation: str
    host: str  # the host being emptied
    left: int  # domains of its plan not (yet) moved off it


@dataclass(frozen=True)
class Fleet:  # a state, a row or a family (None) that could not be read is left out
    jobs: dict[str, int]  # migration job state -> how many (a state not readable: absent)
    waiting: dict[str, int] | None  # gate label (or NO_GATE) -> jobs waiting in lanes behind it
    evacuations: dict[str, int]  # evacuation state -> how many (as `jobs`)
    guests_left: list[GuestsLeft] | None  # one per running evacuation whose plan reads
    alive: dict[str, bool]  # registry host -> its worker's heartbeat is present
    maintenance: dict[str, float | None] | None  # host in maintenance -> since (epoch s)
    unreadable: frozenset[str]  # the PARTS of which something could not be read


def read_fleet(r: redis.Redis, hosts: Iterable[str], *, now_s: float, retention_s: float) -> Fleet:
    """The figures above, in one to three MULTI blocks. An outage raises (RedisError or an
    OS error, for the caller); a key of the wrong type costs only the figures read from it."""
    hosts = sorted(hosts)
    low = now_s - retention_s
    with r.pipeline(transaction=True) as p:
        p.scard(ACTIVE_JOBS)
        queue_script(p, r.register_script(_HOLDER_STATES_LUA), [CLUSTER_GATE], [job_key("")])
        lanes = r.register_script(_WAITING_BY_GATE_LUA)
        queue_script(p, lanes, [LANES, LANES_BLOCKED_BY], [LANE_PREFIX])
        p.zcard(WAITING)
        for state in ALL_FINAL:
            p.zcount(jobs_by_state_key(state), low, "+inf")
        p.smembers(ACTIVE_EVACUATIONS)
        p.zrangebyscore(EVACUATIONS_INDEX, low, "+inf")
        p.mget([heartbeat_key(host) for host in hosts] or [heartbeat_key("")])
        p.hgetall(DISABLED_HOSTS)
        first = p.execute(raise_on_error=False)
    live_total, held, by_gate, legacy = first[:4]
    finals = {s: _ok(n) for s, n in zip(ALL_FINAL, first[4 : 4 + len(ALL_FINAL)], strict=True)}
    live_ids, recent, beats, disabled = (_ok(x) for x in first[4 + len(ALL_FINAL) :])
    live_evacuations: list[str] = sorted(live_ids or ())
    with r.pipeline(transaction=True) as p:
        for state in SHARED_FINAL if recent else ():
            p.zmscore(jobs_by_state_key(state), recent)
        for evacuation_id in live_evacuations:
            p.hmget(job_key(evacuation_id), ["state", "spec", "plan"])
            p.hgetall(children_key(evacuation_id))
        second = p.execute(raise_on_error=False)
    shared = len(SHARED_FINAL) if recent else 0
    ended: dict[str, int | None] = dict.fromkeys(SHARED_FINAL, None if recent is None else 0)
    for state, scores in zip(SHARED_FINAL, second[:shared], strict=False):
        ended[state] = None if _ok(scores) is None else sum(x is not None for x in scores)
    records, kids = second[shared:][::2], second[shared:][1::2]
    held = _ok(held)
    jobs = _jobs(_ok(live_total), held, finals, ended)
    evacuations = _evacuations(None if live_ids is None else records, finals, ended)
    left, left_out = _guests_left(r, live_evacuations, records, kids)
    waiting = _waiting(_ok(by_gate), _ok(legacy))
    maintenance = None if disabled is None else {h: _since(x) for h, x in sorted(disabled.items())}
    unreadable = {
        "jobs": len(jobs) < len(JobState) or any(s not in _HELD for s in held or ()),
        "waiting": waiting is None or int(by_gate[0]) > 0,
        "evacuations": len(evacuations) < len(EvacuationState) or any(map(_failed, records)),
        "guests_left": live_ids is None or left_out,
        "maintenance": disabled is None,
    }
    return Fleet(
        jobs=jobs,
        waiting=waiting,
        evacuations=evacuations,
        guests_left=None if live_ids is None else left,
        alive={host: beat is not None for host, beat in zip(hosts, beats or (), strict=False)},
        maintenance=maintenance,
        unreadable=frozenset(part for part, failed in unreadable.items() if failed),
    )


def _ok(reply: Any) -> Any:
    """A reply, or None for the error Redis answered in its place (a key of the wrong type)."""
    return None if _failed(reply) else reply


def _failed(reply: Any) -> bool:
    return isinstance(reply, Exception)


def _jobs(
    live_total: int | None,
    held: list[str | None] | None,
    finals: dict[str, int | None],
    evacuations_ended: dict[str, int | None],
) -> dict[str, int]:
    """By state; a state whose figure cannot be read is left out."""
    counts: dict[str, int] = {}
    for state in JOB_FINAL:
        total, less = finals[state], evacuations_ended.get(state, 0)
        if total is not None and less is not None:
            counts[state] = max(0, int(total) - less)
    if held is None:  # the slots unread: no live state is known
        return counts
    past = [s.value for s in LIVE if s is not JobState.QUEUED]
    counts |= {state: held.count(state) for state in past}  # an ended holder: counted as ended
    if live_total is not None:
        counts[JobState.QUEUED.value] = max(0, int(live_total) - sum(counts[s] for s in past))
    return counts


def _waiting(by_gate: list[str | int] | None, legacy: int | None) -> dict[str, int] | None:
    """Waiting jobs by the gate their lane is blocked on; the one-line waiting set of
    versions before lanes (moved into lanes by the next safety pass) counts as `none`."""
    if by_gate is None or legacy is None:
        return None
    found: dict[str, int] = {NO_GATE: legacy} if legacy else {}
    for gate, n in zip(by_gate[1::2], by_gate[2::2], strict=True):
        label = gate_label(str(gate)) if gate else NO_GATE
        found[label] = found.get(label, 0) + int(n)
    return found


def _evacuations(
    live: list[Any] | None, finals: dict[str, int | None], ended_shared: dict[str, int | None]
) -> dict[str, int]:
    """By state, as `_jobs`; a record that is not a hash is left out, as one in a state drover
    does not know."""
    known = {s: finals[s] for s in EVACUATION_FINAL} | ended_shared
    counts = {state: int(n) for state, n in known.items() if n is not None}
    if live is not None:
        states = [None if isinstance(x, Exception) else x[0] for x in live]
        counts |= {
            s.value: states.count(s.value) for s in EvacuationState if s not in EVACUATION_TERMINAL
        }
    return counts


def _guests_left(
    r: redis.Redis, ids: list[str], fields: list[Any], children: list[Any]
) -> tuple[list[GuestsLeft], bool]:
    """For each running evacuation, the domains of its plan whose child has not succeeded
    (or was never queued): one more round trip for the children's states. An evacuation
    whose spec, plan or children cannot be read has no row (True: something was left out);
    a child whose record is not a hash counts as not moved."""
    running, left_out = [], False
    for evacuation_id, record, kids in zip(ids, fields, children, strict=True):
        if _failed(record) or record[0] != EvacuationState.RUNNING.value or not record[2]:
            continue  # not running, or no plan yet: no row
        host, domains = _host(record[1]), _plan_domains(record[2])
        if host is None or domains is None or _failed(kids):
            left_out = True
        else:
            running.append((evacuation_id, host, domains, cast(dict[str, str], kids)))
    child_ids = sorted({job_id for *_, kids in running for job_id in kids.values()})
    states: dict[str, Any] = {}
    if child_ids:
        with r.pipeline(transaction=True) as p:
            for job_id in child_ids:
                p.hget(job_key(job_id), "state")
            states = dict(zip(child_ids, p.execute(raise_on_error=False), strict=True))
    left = [
        GuestsLeft(
            evacuation_id,
            host,
            sum(1 for d in domains if d not in kids or states.get(kids[d]) != _SUCCEEDED),
        )
        for evacuation_id, host, domains, kids in running
    ]
    return left, left_out or any(map(_failed, states.values()))


def _host(raw_spec: str | None) -> str | None:
    spec = _json(raw_spec)
    host = spec.get("host") if isinstance(spec, dict) else None
    return host if isinstance(host, str) else None


def _plan_domains(raw_plan: str | None) -> list[str] | None:
    plan = _json(raw_plan)
    if not isinstance(plan, list):
        return None
    return [str(p["domain"]) for p in plan if isinstance(p, dict) and "domain" in p]


def _since(raw: str) -> float | None:
    entry = _json(raw)
    try:
        return datetime.fromisoformat(str(entry["since"])).timestamp()
    except (TypeError, KeyError, ValueError, OverflowError):
        return None


def _json(raw: str | None) -> Any:
    """The JSON in `raw`, or None for none drover can read (nested past Python's limit too)."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
