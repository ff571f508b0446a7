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
while one runs (its children's states); plus redis-py's check that the scripts are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from jobs.connection import queue_script
from jobs.evacuation_model import EVACUATION_TERMINAL, EvacuationState
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    CLUSTER_GATE,
    DISABLED_HOSTS,
    EVACUATIONS_INDEX,
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

# KEYS[1] every lane, KEYS[2] lane -> the gate refusing its head. Returns a flat list of
# gate ('' for none), jobs waiting in the lanes blocked on it. Reads only.
_WAITING_BY_GATE_LUA = """
local counts, order = {}, {}
for _, lane in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('ZCARD', lane)
  if n > 0 then
    local gate = redis.call('HGET', KEYS[2], lane) or ''
    if not counts[gate] then counts[gate] = 0; order[#order + 1] = gate end
    counts[gate] = counts[gate] + n
  end
end
local out = {}
for _, gate in ipairs(order) do out[#out + 1] = gate; out[#out + 1] = counts[gate] end
return out
"""
# KEYS[1] the cluster-wide gate; ARGV[1] the job key prefix. The state of every job holding a
# slot ('' for a record gone), read in the same MULTI as the active set's size. Reads only.
_HOLDER_STATES_LUA = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = redis.call('HGET', ARGV[1] .. id, 'state') or ''
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
class Fleet:
    jobs: dict[str, int]  # every migration job state -> how many
    waiting: dict[str, int]  # gate label (or NO_GATE) -> jobs waiting in lanes behind it
    evacuations: dict[str, int]  # every evacuation state -> how many
    guests_left: list[GuestsLeft]  # one per running evacuation
    alive: dict[str, bool]  # registry host -> its worker's heartbeat is present
    maintenance: dict[str, float | None]  # host in maintenance -> since (epoch s), if known


def read_fleet(r: redis.Redis, hosts: Iterable[str], *, now_s: float, retention_s: float) -> Fleet:
    """The figures above, in one to three MULTI blocks (RedisError for the caller on an
    outage)."""
    hosts = sorted(hosts)
    low = now_s - retention_s
    waiting_by_gate = r.register_script(_WAITING_BY_GATE_LUA)
    holder_states = r.register_script(_HOLDER_STATES_LUA)
    with r.pipeline(transaction=True) as p:
        p.scard(ACTIVE_JOBS)
        queue_script(p, holder_states, [CLUSTER_GATE], [job_key("")])
        queue_script(p, waiting_by_gate, [LANES, LANES_BLOCKED_BY])
        p.zcard(WAITING)
        for state in ALL_FINAL:
            p.zcount(jobs_by_state_key(state), low, "+inf")
        p.smembers(ACTIVE_EVACUATIONS)
        p.zrangebyscore(EVACUATIONS_INDEX, low, "+inf")
        p.mget([heartbeat_key(host) for host in hosts] or [heartbeat_key("")])
        p.hgetall(DISABLED_HOSTS)
        first = p.execute()
    live_total, held, by_gate, legacy = first[:4]
    finals = dict(zip(ALL_FINAL, (int(n) for n in first[4 : 4 + len(ALL_FINAL)]), strict=True))
    rest = first[4 + len(ALL_FINAL) :]
    live_evacuations, recent_evacuations = sorted(rest[0]), list(rest[1])
    beats, disabled = rest[2], rest[3]  # one MGET: a reply per host, not a command

    with r.pipeline(transaction=True) as p:
        for state in SHARED_FINAL if recent_evacuations else ():
            p.zmscore(jobs_by_state_key(state), recent_evacuations)
        for evacuation_id in live_evacuations:
            p.hmget(job_key(evacuation_id), ["state", "spec", "plan"])
            p.hgetall(children_key(evacuation_id))
        second = p.execute()
    rest = second
    shared = len(SHARED_FINAL) if recent_evacuations else 0
    evacuations_ended = {
        state: sum(1 for score in scores if score is not None)
        for state, scores in zip(SHARED_FINAL, rest[:shared], strict=False)
    }
    running = rest[shared:]

    return Fleet(
        jobs=_jobs(int(live_total), [str(x) for x in held], finals, evacuations_ended),
        waiting=_waiting(by_gate, int(legacy)),
        evacuations=_evacuations(running[::2], finals, evacuations_ended),
        guests_left=_guests_left(r, live_evacuations, running[::2], running[1::2]),
        alive={host: beat is not None for host, beat in zip(hosts, beats, strict=False)},
        maintenance={host: _since(raw) for host, raw in sorted(disabled.items())},
    )


def _jobs(
    live_total: int,
    held: list[str],
    finals: dict[str, int],
    evacuations_ended: dict[str, int],
) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in JobState), 0)
    live = {s.value for s in LIVE}
    for state in held:  # a holder that ended (its slot not pruned yet) is counted as ended
        if state in live and state != JobState.QUEUED.value:
            counts[state] += 1
    past_admission = sum(counts.values())
    counts[JobState.QUEUED.value] = max(0, live_total - past_admission)
    for state in JOB_FINAL:
        counts[state] = max(0, finals[state] - evacuations_ended.get(state, 0))
    return counts


def _waiting(by_gate: list[str | int], legacy: int) -> dict[str, int]:
    """Waiting jobs by the gate their lane is blocked on; the one-line waiting set of
    versions before lanes (moved into lanes by the next safety pass) counts as `none`."""
    found: dict[str, int] = {NO_GATE: legacy} if legacy else {}
    for gate, n in zip(by_gate[::2], by_gate[1::2], strict=True):
        label = gate_label(str(gate)) if gate else NO_GATE
        found[label] = found.get(label, 0) + int(n)
    return found


def _evacuations(
    live: list[list[str | None]], finals: dict[str, int], ended_shared: dict[str, int]
) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in EvacuationState), 0)
    for state, _spec, _plan in live:
        if state in counts and state not in EVACUATION_FINAL:
            counts[state] += 1
    for state in EVACUATION_FINAL:
        counts[state] = ended_shared.get(state, 0) if state in SHARED_FINAL else finals[state]
    return counts


def _guests_left(
    r: redis.Redis,
    ids: list[str],
    fields: list[list[str | None]],
    children: list[dict[str, str]],
) -> list[GuestsLeft]:
    """For each running evacuation, the domains of its plan whose child has not succeeded
    (or was never queued): one more round trip for the children's states."""
    running = [
        (evacuation_id, _host(spec), _plan_domains(plan), kids)
        for evacuation_id, (state, spec, plan), kids in zip(ids, fields, children, strict=True)
        if state == EvacuationState.RUNNING.value and plan
    ]
    child_ids = sorted({job_id for *_, kids in running for job_id in kids.values()})
    states: dict[str, str | None] = {}
    if child_ids:
        with r.pipeline(transaction=True) as p:
            for job_id in child_ids:
                p.hget(job_key(job_id), "state")
            states = dict(zip(child_ids, p.execute(), strict=True))
    return [
        GuestsLeft(
            evacuation_id,
            host,
            sum(1 for d in domains if d not in kids or states.get(kids[d]) != _SUCCEEDED),
        )
        for evacuation_id, host, domains, kids in running
    ]


def _host(raw_spec: str | None) -> str:
    spec = _json(raw_spec)
    return str(spec.get("host", "")) if isinstance(spec, dict) else ""


def _plan_domains(raw_plan: str | None) -> list[str]:
    plan = _json(raw_plan)
    if not isinstance(plan, list):
        return []
    return [str(p["domain"]) for p in plan if isinstance(p, dict) and "domain" in p]


def _since(raw: str) -> float | None:
    entry = _json(raw)
    try:
        return datetime.fromisoformat(str(entry["since"])).timestamp()
    except (TypeError, KeyError, ValueError):
        return None


def _json(raw: str | None) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None
