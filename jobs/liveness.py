"""Who holds what, and who is alive: domain leases, the worker running a phase, memory
reservations, workers' heartbeats, host reports and draining marks."""

from __future__ import annotations

import json
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, cast

import redis

from jobs.keys import (
    ACTIVE_JOBS,
    LEASE_FIELD_PREFIX,
    draining_key,
    heartbeat_key,
    host_report_key,
    job_key,
    lease_field,
    reservations_key,
    runner_key,
)
from jobs.record_read import KeyUnreadable, shared_key_read
from jobs.reservation_read import RESERVE_LUA, reserved_by_host
from jobs.spec import MigrationSpec
from jobs.states import LIVE, TERMINAL

LEASE_ATTEMPTS = 3
LEASE_TAKEN, LEASE_JOB_ENDED = 1, -1
MS_PER_S = 1000

# Compare-and-delete for leases and marks: only the holder may drop its own. A key of another
# type (a lock made a hash or list by hand) is no holder's: passed over and left as found, so
# that a job's end (release_leases, run straight after it) does not fail with WRONGTYPE after
# the end itself was written, as the end's own script does (jobs/retention.py).
_RELEASE_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Compare-and-extend, a key of another type passed over alike.
_RENEW_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Take a domain lease for a live job only, noting it in the job's record in the same step: a
# lease taken after the job's end (which gives its leases back, jobs/retention.py) would hold
# the domain for a finished job. KEYS[1] lock, KEYS[2] job hash; ARGV[1] job id, ARGV[2] the
# record's lease field, ARGV[3..] live states. Returns {1} taken, {0, holder}, {-1} ended.
_TAKE_LUA = """
local cur = redis.call('HGET', KEYS[2], 'state')
local live = false
for i = 3, #ARGV do if cur == ARGV[i] then live = true end end
if not live then return {-1} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('HSET', KEYS[2], ARGV[2], '1')
  return {1}
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""
# Renew a worker's mark on a phase, or put it back if it lapsed (a Redis outage longer than
# its time to live): the worker still runs the phase. Never over another worker's mark.
_KEEP_MARK_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# The same for every mark a worker holds, in one call (its heartbeat): ARGV[1] the worker,
# ARGV[2] the time to live in ms, ARGV[3] the marks' keys, space-separated (one argument: at
# ten thousand marks, encoding one key per argument costs the client more than Redis spends
# renewing them). Returns the positions (from 1) of the marks another worker holds: nearly
# always none, so the answer stays small however many marks.
_KEEP_MARKS_LUA = """
local others, i = {}, 0
for key in string.gmatch(ARGV[3], '%S+') do
  i = i + 1
  local cur = redis.call('GET', key)
  if cur == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  elseif not cur then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    others[#others + 1] = i
  end
end
return others
"""


def _ms(seconds: float) -> int:
    return int(seconds * MS_PER_S)


class Liveness:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._keep_mark = client.register_script(_KEEP_MARK_LUA)
        self._keep_marks = client.register_script(_KEEP_MARKS_LUA)
        self._reserve = client.register_script(RESERVE_LUA)
        self._take = client.register_script(_TAKE_LUA)

    # --- leases: one active job per domain ----------------------------------------------------

    def _ended(self, job_id: str) -> bool:
        state = cast(str | None, self.r.hget(job_key(job_id), "state"))
        return state is None or state in TERMINAL

    def take_lease(self, key: str, job_id: str) -> str | None:
        """Hold `key` for `job_id`: None when held, else the id of the live job holding it.

        A lease has no expiry: it lasts as long as its job lives, and is taken over only from
        a job that has ended or vanished. A timer, however often renewed, can run out under a
        live migration (a worker whose keeper stalled, a Redis outage) and let a second job
        of the same domain in, whose rollback would then act on the first job's guest.
        A job that has ended (or vanished) takes nothing: its own id comes back.
        """
        holder: str | None = None
        live = [state.value for state in LIVE]
        for _ in range(LEASE_ATTEMPTS):
            taken = cast(
                list[Any],
                self._take(keys=[key, job_key(job_id)], args=[job_id, lease_field(key), *live]),
            )
            if int(taken[0]) == LEASE_TAKEN:
                return None
            if int(taken[0]) == LEASE_JOB_ENDED:
                return job_id
            holder = str(taken[1]) or None
            if holder == job_id:
                return None
            if holder is None:
                continue  # released between the two steps
            if not self._ended(holder):
                return holder
            # Its holder ended without releasing it (a crash between two writes).
            self._release(keys=[key], args=[holder])
        return holder

    def leases_of(self, job_id: str) -> list[str]:
        fields = cast(dict[str, str], self.r.hgetall(job_key(job_id)))
        return [
            f.removeprefix(LEASE_FIELD_PREFIX) for f in fields if f.startswith(LEASE_FIELD_PREFIX)
        ]

    def release_leases(self, job_id: str) -> None:
        """The job's domain leases (the one thing its terminal transition does not free)."""
        for key in self.leases_of(job_id):
            self._release(keys=[key], args=[job_id])

    def release_holds(self, job_id: str) -> None:
        """Everything a finished job held: domain leases, reservations, its active mark (after
        a crash between its terminal transition and the leases, or a phase that took
        something after the job ended)."""
        self.release_leases(job_id)
        raw = cast(str | None, self.r.hget(job_key(job_id), "spec"))
        if raw is None:
            return
        spec = MigrationSpec.model_validate_json(raw)
        for host in (spec.src, spec.dst):
            self.release(host, job_id)
        self.r.srem(ACTIVE_JOBS, job_id)

    # --- who runs a phase: by worker identity, not per process ------------------------------

    def take_runner(self, job_id: str, phase: str, worker: str, ttl_s: float) -> str | None:
        """Mark `worker` as the one running the phase: None when it is (now) ours, else the
        live worker that runs it. The mark lives `ttl_s` unless renewed by its worker's
        heartbeat, so a dead worker's phase is free for recovery once that has passed."""
        key, ttl_ms = runner_key(job_id, phase), _ms(ttl_s)
        for _ in range(LEASE_ATTEMPTS):
            if self.r.set(key, worker, nx=True, px=ttl_ms):
                return None
            holder = cast(str | None, self.r.get(key))
            if holder == worker:
                self._renew(keys=[key], args=[worker, ttl_ms])
                return None
            if holder is not None:
                return holder
        return cast(str | None, self.r.get(key))

    def renew_runner(self, job_id: str, phase: str, worker: str, ttl_s: float) -> bool:
        """Keep `worker`'s mark (putting it back if it lapsed); False if another holds it."""
        kept = self._keep_mark(keys=[runner_key(job_id, phase)], args=[worker, _ms(ttl_s)])
        return bool(kept)

    def renew_runners(
        self, marks: list[tuple[str, str]], worker: str, ttl_s: float
    ) -> list[tuple[str, str]]:
        """`renew_runner` for every (job id, phase) in `marks` in one round trip, so a
        heartbeat costs one call however many phases its worker runs. Returns the marks
        another worker holds (left as they are)."""
        if not marks:
            return []
        keys = " ".join(runner_key(job_id, phase) for job_id, phase in marks)
        others = cast(list[int], self._keep_marks(args=[worker, _ms(ttl_s), keys]))
        return [marks[i - 1] for i in others]

    def drop_runner(self, job_id: str, phase: str, worker: str) -> None:
        self._release(keys=[runner_key(job_id, phase)], args=[worker])

    def runner(self, job_id: str, phase: str) -> str | None:
        return cast(str | None, self.r.get(runner_key(job_id, phase)))

    # --- reservations -----------------------------------------------------------------------

    def reserve(self, host: str, job_id: str, memory_mib: int) -> bool:
        """Book `memory_mib` on `host` for a live job; False (nothing booked) once it ended.
        KeyUnreadable (nothing booked) when the host's reservations key is not a hash."""
        live = [state.value for state in LIVE]
        key = reservations_key(host)
        with shared_key_read(self.r, key, "hash"):
            booked = self._reserve(keys=[job_key(job_id), key], args=[job_id, memory_mib, *live])
        return bool(booked)

    def release(self, host: str, job_id: str) -> None:
        """Give back `job_id`'s booking; a reservations key that is not a hash holds none."""
        key = reservations_key(host)
        with suppress(KeyUnreadable), shared_key_read(self.r, key, "hash"):
            self.r.hdel(key, job_id)

    def reserved_mib(self, host: str, *, excluding: str | None = None) -> int | None:
        """MiB booked on `host`; a booking drover did not write never crashes the reader nor
        adds room (jobs/reservation_read.py). None, said, when its reservations key is not a
        hash: nothing can be known of it, and worker/host_memory.py reads None as no room."""
        found = reserved_by_host(self.r, [host], excluding=excluding)[host]
        return found if isinstance(found, int) else None

    # --- hosts ---------------------------------------------------------------------------

    def set_draining(self, host: str, info: dict[str, Any], ttl_s: float) -> None:
        self.r.set(draining_key(host), json.dumps(info), px=_ms(ttl_s))

    def draining(self, host: str) -> dict[str, Any] | None:
        """What a draining worker last said of itself, or None when `host`'s is not draining,
        or when the mark is not one a worker writes (anyone with the Redis password can set
        it): unknown, never a reason for a reader to fail."""
        return draining_info(cast(str | None, self.r.get(draining_key(host))))

    def heartbeat(self, host: str, ttl_s: float, worker: str = "") -> None:
        """`host` has a worker taking work (`worker` names the process)."""
        stamp = worker or datetime.now(UTC).isoformat()
        self.r.set(heartbeat_key(host), stamp, px=_ms(ttl_s))

    def drop_heartbeat(self, host: str, worker: str) -> None:
        """`worker` no longer takes work; a worker beside it that does keeps the host alive."""
        self._release(keys=[heartbeat_key(host)], args=[worker])

    def alive(self, host: str) -> bool:
        return bool(self.r.exists(heartbeat_key(host)))

    def report_host(self, host: str, report: dict[str, Any], ttl_s: float) -> None:
        """A worker's view of its host (free memory, running domains) for `drover hosts`."""
        self.r.set(host_report_key(host), json.dumps(report), px=_ms(ttl_s))

    def host_report(self, host: str) -> dict[str, Any]:
        """A worker's last report of `host`; {} when none, or none a worker wrote (its fields
        are the reader's to check)."""
        report = _json(cast(str | None, self.r.get(host_report_key(host))))
        return cast(dict[str, Any], report) if isinstance(report, dict) else {}


# A draining mark as the keeper writes it (worker/keeper.py `_drain_report`): field -> types.
_DRAINING_FIELDS: dict[str, tuple[type, ...]] = {
    "since": (str,),
    "worker": (str,),
    "running": (list,),
    "drain_timeout": (int, float),
}


def draining_info(raw: str | None) -> dict[str, Any] | None:
    """A draining mark, or None unless it is a JSON object with every field of the type a
    worker writes (`running` a list of job ids)."""
    info = _json(raw)
    if not isinstance(info, dict):
        return None
    for field, types in _DRAINING_FIELDS.items():
        value = info.get(field)
        if isinstance(value, bool) or not isinstance(value, types):
            return None
    if not all(isinstance(job_id, str) for job_id in info["running"]):
        return None
    return cast(dict[str, Any], info)


def _json(raw: str | None) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # RecursionError: a deep nest of brackets
        return None
