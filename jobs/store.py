"""Jobs, reservations and event streams in Redis, shared by producers and workers.

State changes go through one Lua script, a compare-and-set: a transition happens only from a
state allowed to precede it, and the state, its timestamp and the history entry are written
together. Two workers (or a redelivered message) can therefore never both move a job on.
"""

from __future__ import annotations

import builtins
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs.model import Job, PhaseRecord, Transition
from jobs.request_signing import MIGRATION_KIND, REQUEST_FIELD, RequestSigner, signed_record
from jobs.spec import MigrationSpec
from jobs.states import LIVE, TERMINAL, JobState, allowed_sources

KEY_PREFIX = "drover"
JOBS_INDEX = f"{KEY_PREFIX}:jobs"
ACTIVE_JOBS = f"{KEY_PREFIX}:active"
# Jobs not yet admitted, oldest first (jobs/admission.py).
WAITING = f"{KEY_PREFIX}:waiting"
# Evacuations share the job id space, index and event streams; their records say so.
EVENT_FIELD = "data"
# When libvirt switched a job's migration to post-copy (absent: it never did).
POSTCOPY_FIELD = "postcopy_since"
EVENT_READ_BATCH = 500
RETRY_CAP_S = 1.0
LEASE_ATTEMPTS = 3
RETRY_BASE_S = 0.05
# What an outage looks like to redis-py: its own connection errors (a dropped connection,
# a server still loading its AOF) and timeouts, and the OS errors of a connect to a server
# that is not there (refused, reset; a unix socket removed while it is stopped). redis-py's
# own Retry leaves the OS errors out, so a refused connect was never retried.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    socket.timeout,
    builtins.ConnectionError,
    FileNotFoundError,
)

T = TypeVar("T")

# KEYS[1] job hash, KEYS[2] transitions list, KEYS[3] active-jobs set, KEYS[4] the waiting
# line; ARGV[1] target state,
# ARGV[2] timestamp, ARGV[3] transition JSON, ARGV[4] reason ("" for none), ARGV[5] job id,
# ARGV[6] "1" if the target is terminal, ARGV[7..] allowed source states.
# Returns {1, previous} when moved, {2, current} when already there, {0, current} if refused.
# Ending a job gives back its concurrency slots (the `gates` it was admitted through) in the
# same step (and its memory reservations), so no crash can leave a slot or a reservation held
# by a job that has ended. Leaving `stalled` clears the stall's reason and origin (the history
# keeps them): a job that resumed is no longer stalled for that reason. A job that succeeds
# has no abort pending any more: one that came too late to act on (libvirt cannot abort a
# post-copy migration) is dropped, as the job's events say.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if cur == ARGV[1] then return {2, cur} end
for i = 7, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    if cur == 'stalled' then redis.call('HDEL', KEYS[1], 'reason', 'stalled_from') end
    if ARGV[1] == 'succeeded' then redis.call('HDEL', KEYS[1], 'abort_requested') end
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
    if ARGV[1] == 'stalled' then redis.call('HSET', KEYS[1], 'stalled_from', cur) end
    redis.call('RPUSH', KEYS[2], ARGV[3])
    if ARGV[6] == '1' then
      redis.call('SREM', KEYS[3], ARGV[5])
      redis.call('ZREM', KEYS[4], ARGV[5])
      local gates = redis.call('HGET', KEYS[1], 'gates')
      if gates then
        for gate in string.gmatch(gates, '%S+') do redis.call('SREM', gate, ARGV[5]) end
      end
      local spec = cjson.decode(redis.call('HGET', KEYS[1], 'spec'))
      for _, host in ipairs({spec['src'], spec['dst']}) do
        redis.call('HDEL', '__RESERVATIONS__' .. host .. ':reservations', ARGV[5])
      end
    end
    return {1, cur}
  end
end
return {0, cur}
""".replace("__RESERVATIONS__", f"{KEY_PREFIX}:host:")

# Compare-and-delete / compare-and-extend for leases: only the holder may touch its lease.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Book memory for a job only while it lives: a reservation written after the job's terminal
# transition (which frees reservations) would hold that memory for ever.
# KEYS[1] job hash, KEYS[2] reservations hash; ARGV[1] job id, ARGV[2] MiB, ARGV[3..] live states.
_RESERVE_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
for i = 3, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
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
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def now() -> datetime:
    return datetime.now(UTC)


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{job_key(job_id)}:events"


def reservations_key(host: str) -> str:
    return f"{KEY_PREFIX}:host:{host}:reservations"


def heartbeat_key(host: str) -> str:
    return f"{KEY_PREFIX}:worker:{host}:alive"


def children_key(evacuation_id: str) -> str:
    """An evacuation's child jobs: domain -> job id."""
    return f"{job_key(evacuation_id)}:children"


def host_report_key(host: str) -> str:
    return f"{KEY_PREFIX}:worker:{host}:report"


def draining_key(host: str) -> str:
    """Set by a worker in warm shutdown: since when, and what it still runs."""
    return f"{KEY_PREFIX}:worker:{host}:draining"


def runner_key(job_id: str, phase: str) -> str:
    """Which worker process runs a job's phase now (the phase record says only which host)."""
    return f"{job_key(job_id)}:runner:{phase}"


def redispatched_field(phase: str) -> str:
    return f"redispatched:{phase}"


def domain_lock_key(kind: str, value: str) -> str:
    """One active job per domain: by name at submit, by UUID once the source has looked."""
    return f"{KEY_PREFIX}:lock:{kind}:{value}"


def _in_run_order(raw: dict[str, str]) -> dict[str, PhaseRecord]:
    records = [PhaseRecord.model_validate_json(v) for v in raw.values()]
    return {r.phase: r for r in sorted(records, key=lambda r: r.started)}


class JobNotFound(LookupError):
    pass


class OutageRetry(Retry):
    """Retry a Redis call through an outage for `retry_for` seconds from when it started.

    redis-py counts attempts, and its connection pool connects outside the command's retry
    with a Retry that does not cover a refused connect, so `retry_on_error` alone never rode
    out a stopped server: a command failed at once. Here the connect is retried too (it runs
    this same Retry), for a time rather than a count: a connect retried inside a command's
    retry spends the same budget, so the two never add up to more than `retry_for`. A wrong
    password is not an outage and fails at once.
    """

    def __init__(self, retry_for: float) -> None:
        super().__init__(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), -1, OUTAGE_ERRORS)
        self.retry_for = retry_for

    def call_with_retry(self, do: Callable[[], T], fail: Callable[[Exception], Any]) -> T:
        started = time.monotonic()  # (ExponentialBackoff keeps no state to reset)
        failures = 0
        while True:
            try:
                return do()
            except redis.AuthenticationError:
                raise
            except self._supported_errors as error:
                failures += 1
                fail(error)
                left = self.retry_for - (time.monotonic() - started)
                if left <= 0:
                    raise error
                time.sleep(min(self._backoff.compute(failures), left))


class Guard(Protocol):
    """Runs one Redis call on a caller's terms (a follower riding out an outage)."""

    def __call__(self, fn: Callable[[], T], /) -> T: ...


def direct(fn: Callable[[], T], /) -> T:
    return fn()


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        event_maxlen: int = 10_000,
        without_retry: JobStore | None = None,
    ) -> None:
        self.r = client
        self.event_maxlen = event_maxlen
        self._without_retry = without_retry
        self._transition = client.register_script(_TRANSITION_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._keep_mark = client.register_script(_KEEP_MARK_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        event_maxlen: int = 10_000,
        retry_for: float = 0.0,
        probe_timeout: float | None = None,
    ) -> JobStore:
        """A store on `url`; with `retry_for`, each command rides out a Redis outage that long
        (OutageRetry), and `without_retry` is the same store failing at once instead.

        `probe_timeout` bounds the connect and each reply of that store without retries (or
        of this one, without `retry_for`): a server that does not answer is an outage too.
        """
        options: dict[str, Any] = {"decode_responses": True}
        if probe_timeout is not None and retry_for <= 0:
            options |= {"socket_connect_timeout": probe_timeout, "socket_timeout": probe_timeout}
        if retry_for <= 0:
            return cls(redis.Redis.from_url(url, **options), event_maxlen=event_maxlen)
        once = cls.from_url(url, event_maxlen=event_maxlen, probe_timeout=probe_timeout)
        client = redis.Redis.from_url(url, retry=OutageRetry(retry_for), **options)
        return cls(client, event_maxlen=event_maxlen, without_retry=once)

    @property
    def without_retry(self) -> JobStore:
        """This store for a caller that must not wait out an outage: one try, then the error.

        The monitor of a running migration checks for an abort and publishes its progress
        through it, so that libvirt's migration is watched whether Redis answers or not.
        """
        return self._without_retry or self

    # --- jobs -------------------------------------------------------------------------------

    def create(
        self,
        spec: MigrationSpec,
        *,
        host: str,
        parent: str | None = None,
        parent_limit: int | None = None,
        signer: RequestSigner | None = None,
    ) -> str:
        """Record a new queued job; `parent` is the evacuation it belongs to, if any, and
        `parent_limit` that evacuation's --max-parallel (a gate at admission). With a
        `signer`, the request is signed as `host` asked for it (jobs/request_signing.py)."""
        ts = now()
        job_id = secrets.token_hex(6)
        first = Transition(state=JobState.QUEUED, at=ts, host=host)
        record = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "state": JobState.QUEUED.value,
            "created": ts.isoformat(),
            "updated": ts.isoformat(),
            **signed_record(
                signer,
                kind=MIGRATION_KIND,
                job_id=job_id,
                spec=spec,
                parent=parent,
                parent_limit=parent_limit,
                origin=host,
                at=ts,
            ),
        }
        if parent is not None:
            record["parent"] = parent
        if parent_limit is not None:
            record["parent_limit"] = str(parent_limit)
        with self.r.pipeline(transaction=True) as p:
            p.hset(job_key(job_id), mapping=record)
            if parent is not None:  # in the same step: a crash cannot leave an orphan child
                p.hset(children_key(parent), spec.domain, job_id)
            p.rpush(f"{job_key(job_id)}:transitions", first.model_dump_json())
            p.zadd(JOBS_INDEX, {job_id: ts.timestamp()})
            p.sadd(ACTIVE_JOBS, job_id)
            p.execute()
        return job_id

    def discard(self, job_id: str) -> None:
        """Remove a job that was never queued (its submission was refused)."""
        parent, raw_spec = cast(list[str | None], self.r.hmget(job_key(job_id), ["parent", "spec"]))
        with self.r.pipeline(transaction=True) as p:
            if parent and raw_spec:
                p.hdel(children_key(parent), MigrationSpec.model_validate_json(raw_spec).domain)
            p.delete(job_key(job_id), f"{job_key(job_id)}:transitions", events_key(job_id))
            p.zrem(JOBS_INDEX, job_id)
            p.srem(ACTIVE_JOBS, job_id)
            p.zrem(WAITING, job_id)
            p.execute()

    def get(self, job_id: str) -> Job:
        with self.r.pipeline(transaction=True) as p:
            p.hgetall(job_key(job_id))
            p.hgetall(f"{job_key(job_id)}:phases")
            p.lrange(f"{job_key(job_id)}:transitions", 0, -1)
            raw, phases, transitions = p.execute()
        if not raw:
            raise JobNotFound(f"no job {job_id!r}")
        if raw.get("kind", MIGRATION_KIND) != MIGRATION_KIND:
            raise JobNotFound(f"{job_id} is an {raw['kind']}, not a migration job")
        return Job(
            id=raw["id"],
            spec=MigrationSpec.model_validate_json(raw["spec"]),
            state=JobState(raw["state"]),
            created=datetime.fromisoformat(raw["created"]),
            updated=datetime.fromisoformat(raw["updated"]),
            reason=raw.get("reason"),
            stalled_from=JobState(raw["stalled_from"]) if raw.get("stalled_from") else None,
            abort_requested=raw.get("abort_requested"),
            postcopy_since=(
                datetime.fromisoformat(raw[POSTCOPY_FIELD]) if raw.get(POSTCOPY_FIELD) else None
            ),
            admitted=datetime.fromisoformat(raw["admitted"]) if raw.get("admitted") else None,
            waiting_for=raw.get("waiting_for"),
            parent=raw.get("parent"),
            parent_limit=int(raw["parent_limit"]) if raw.get("parent_limit") else None,
            request=raw.get(REQUEST_FIELD),
            facts=json.loads(raw.get("facts", "{}")),
            handoff=json.loads(raw.get("handoff", "{}")),
            result=json.loads(raw.get("result", "{}")),
            phases=_in_run_order(phases),
            transitions=[Transition.model_validate_json(t) for t in transitions],
        )

    def state(self, job_id: str) -> JobState:
        value = cast(str | None, self.r.hget(job_key(job_id), "state"))
        if value is None:
            raise JobNotFound(f"no job {job_id!r}")
        return JobState(value)

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        host: str,
        reason: str | None = None,
        only_from: JobState | None = None,
    ) -> tuple[bool, JobState | None]:
        """Move the job to `target` if its current state allows it; (moved, previous state).

        A job already in `target` is not moved again: (False, target) tells the caller so
        (a phase run again by recovery re-enters the state it had reached). `only_from`
        narrows the allowed sources to the state the caller decided on.
        """
        ts = now()
        entry = Transition(state=target, at=ts, host=host, reason=reason).model_dump_json()
        allowed = allowed_sources(target)
        if only_from is not None:
            allowed = allowed & {only_from}
        sources = sorted(s.value for s in allowed)
        terminal = "1" if target in TERMINAL else "0"
        moved, previous = self._transition(
            keys=[job_key(job_id), f"{job_key(job_id)}:transitions", ACTIVE_JOBS, WAITING],
            args=[target.value, ts.isoformat(), entry, reason or "", job_id, terminal, *sources],
        )
        if moved == 1 and target in TERMINAL:
            self.release_holds(job_id)
        return moved == 1, JobState(previous) if previous else None

    def hosts_of(self, job_id: str) -> tuple[str, ...]:
        """The job's source and destination (nothing for a job gone meanwhile)."""
        raw = cast(str | None, self.r.hget(job_key(job_id), "spec"))
        if raw is None:
            return ()
        spec = MigrationSpec.model_validate_json(raw)
        return (spec.src, spec.dst)

    def active_ids(self) -> list[str]:
        return sorted(cast(set[str], self.r.smembers(ACTIVE_JOBS)))

    def field(self, job_id: str, name: str) -> str | None:
        return cast(str | None, self.r.hget(job_key(job_id), name))

    # --- what makes phases idempotent and jobs abortable -------------------------------------

    def claim_phase(self, job_id: str, phase: str, host: str) -> bool:
        """True for the first caller only: a phase runs once per job, however often it is sent."""
        return bool(self.r.hsetnx(f"{job_key(job_id)}:claims", phase, host))

    def unclaim_phase(self, job_id: str, phase: str) -> None:
        """Give a phase back before a retry (it stopped before changing anything)."""
        self.r.hdel(f"{job_key(job_id)}:claims", phase)

    def request_abort(self, job_id: str, reason: str) -> None:
        self.r.hset(job_key(job_id), "abort_requested", reason)

    def withdraw_abort(self, job_id: str) -> None:
        """Take back an abort request that cannot be carried out."""
        self.r.hdel(job_key(job_id), "abort_requested")

    def abort_requested(self, job_id: str) -> str | None:
        return self.field(job_id, "abort_requested")

    def mark_postcopy(self, job_id: str) -> None:
        """Record that libvirt switched the job's migration to post-copy: from then on it
        cannot be aborted (the guest already runs on the destination), and `abort` says so."""
        self.r.hset(job_key(job_id), POSTCOPY_FIELD, now().isoformat())

    # --- leases: one active job per domain, workers' liveness ---------------------------------

    def take_lease(self, key: str, job_id: str) -> str | None:
        """Hold `key` for `job_id`: None when held, else the id of the live job holding it.

        A lease has no expiry: it lasts as long as its job lives, and is taken over only from
        a job that has ended or vanished. A timer, however often renewed, can run out under a
        live migration (a worker whose keeper stalled, a Redis outage) and let a second job
        of the same domain in, whose rollback would then act on the first job's guest.
        """
        holder: str | None = None
        for _ in range(LEASE_ATTEMPTS):
            if self.r.set(key, job_id, nx=True):
                self.r.hset(job_key(job_id), f"lease:{key}", "1")
                return None
            holder = cast(str | None, self.r.get(key))
            if holder == job_id:
                return None
            if holder is None:
                continue  # expired between the two calls
            try:
                stale = self.state(holder) in TERMINAL
            except JobNotFound:
                stale = True
            if not stale:
                return holder
            # Its holder ended without releasing it (a crash between two writes).
            self._release(keys=[key], args=[holder])
        return holder

    def leases_of(self, job_id: str) -> list[str]:
        fields = cast(dict[str, str], self.r.hgetall(job_key(job_id)))
        return [f.removeprefix("lease:") for f in fields if f.startswith("lease:")]

    def release_holds(self, job_id: str) -> None:
        """Everything a finished job held: domain leases, reservations, its active mark."""
        for key in self.leases_of(job_id):
            self._release(keys=[key], args=[job_id])
        try:
            job = self.get(job_id)
        except JobNotFound:
            return
        for host in (job.spec.src, job.spec.dst):
            self.release(host, job_id)
        self.r.srem(ACTIVE_JOBS, job_id)

    # --- who runs a phase: by worker identity, not per process ------------------------------

    def take_runner(self, job_id: str, phase: str, worker: str, ttl_s: float) -> str | None:
        """Mark `worker` as the one running the phase: None when it is (now) ours, else the
        live worker that runs it. The mark lives `ttl_s` unless renewed by its worker's
        heartbeat, so a dead worker's phase is free for recovery once that has passed."""
        key, ttl_ms = runner_key(job_id, phase), int(ttl_s * 1000)
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
        kept = self._keep_mark(keys=[runner_key(job_id, phase)], args=[worker, int(ttl_s * 1000)])
        return bool(kept)

    def drop_runner(self, job_id: str, phase: str, worker: str) -> None:
        self._release(keys=[runner_key(job_id, phase)], args=[worker])

    def runner(self, job_id: str, phase: str) -> str | None:
        return cast(str | None, self.r.get(runner_key(job_id, phase)))

    def mark_redispatched(self, job_id: str, phase: str) -> None:
        self.r.hset(job_key(job_id), redispatched_field(phase), now().isoformat())

    def redispatched_at(self, job_id: str, phase: str) -> datetime | None:
        raw = self.field(job_id, redispatched_field(phase))
        return datetime.fromisoformat(raw) if raw else None

    # --- hosts ---------------------------------------------------------------------------

    def set_draining(self, host: str, info: dict[str, Any], ttl_s: float) -> None:
        self.r.set(draining_key(host), json.dumps(info), px=int(ttl_s * 1000))

    def draining(self, host: str) -> dict[str, Any] | None:
        """What a draining worker last said of itself, or None when `host`'s is not draining."""
        raw = cast(str | None, self.r.get(draining_key(host)))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    def heartbeat(self, host: str, ttl_s: float, worker: str = "") -> None:
        """`host` has a worker taking work (`worker` names the process)."""
        self.r.set(heartbeat_key(host), worker or now().isoformat(), px=int(ttl_s * 1000))

    def drop_heartbeat(self, host: str, worker: str) -> None:
        """`worker` no longer takes work; a worker beside it that does keeps the host alive."""
        self._release(keys=[heartbeat_key(host)], args=[worker])

    def alive(self, host: str) -> bool:
        return bool(self.r.exists(heartbeat_key(host)))

    def report_host(self, host: str, report: dict[str, Any], ttl_s: float) -> None:
        """A worker's view of its host (free memory, running domains) for `drover hosts`."""
        self.r.set(host_report_key(host), json.dumps(report), px=int(ttl_s * 1000))

    def host_report(self, host: str) -> dict[str, Any]:
        raw = cast(str | None, self.r.get(host_report_key(host)))
        return cast(dict[str, Any], json.loads(raw)) if raw else {}

    def update(self, job_id: str, **fields: dict[str, Any]) -> None:
        """Merge JSON fields (facts, handoff, result) into the job record."""
        key = job_key(job_id)
        current = cast(list[str | None], self.r.hmget(key, list(fields)))
        merged = {
            name: json.dumps({**json.loads(old or "{}"), **value})
            for (name, value), old in zip(fields.items(), current, strict=True)
        }
        self.r.hset(key, mapping=merged)

    def phase_started(self, job_id: str, phase: str, host: str) -> None:
        """Record the start; whatever the job was said to wait for is over."""
        rec = PhaseRecord(phase=phase, host=host, started=now())
        with self.r.pipeline(transaction=True) as p:
            p.hset(f"{job_key(job_id)}:phases", phase, rec.model_dump_json())
            p.hdel(job_key(job_id), "waiting_for")
            p.execute()

    def set_waiting_for(self, job_id: str, reason: str) -> None:
        """Why an admitted job's next step has not started (shown until it starts)."""
        self.r.hset(job_key(job_id), "waiting_for", reason)

    def phase_ended(self, job_id: str, phase: str, error: str | None = None) -> None:
        key = f"{job_key(job_id)}:phases"
        raw = cast(str | None, self.r.hget(key, phase))
        if raw is None:
            return
        rec = PhaseRecord.model_validate_json(raw).model_copy(
            update={"ended": now(), "error": error}
        )
        self.r.hset(key, phase, rec.model_dump_json())

    def recent_ids(self, limit: int = 50) -> list[str]:
        """Newest first: migrations and evacuations alike."""
        return cast(list[str], self.r.zrevrange(JOBS_INDEX, 0, limit - 1))

    def kind(self, job_id: str) -> str:
        """ "migration" or "evacuation"; JobNotFound for an unknown id."""
        raw = cast(list[str | None], self.r.hmget(job_key(job_id), ["id", "kind"]))
        if raw[0] is None:
            raise JobNotFound(f"no job {job_id!r}")
        return raw[1] or MIGRATION_KIND

    def recent(self, limit: int = 50) -> list[Job]:
        jobs = []
        for job_id in self.recent_ids(limit):
            try:
                jobs.append(self.get(job_id))
            except JobNotFound:
                continue
        return jobs

    # --- reservations -----------------------------------------------------------------------

    def reserve(self, host: str, job_id: str, memory_mib: int) -> bool:
        """Book `memory_mib` on `host` for a live job; False (nothing booked) once it ended."""
        live = [state.value for state in LIVE]
        booked = self._reserve(
            keys=[job_key(job_id), reservations_key(host)], args=[job_id, memory_mib, *live]
        )
        return bool(booked)

    def release(self, host: str, job_id: str) -> None:
        self.r.hdel(reservations_key(host), job_id)

    def reserved_mib(self, host: str, *, excluding: str | None = None) -> int:
        held = cast(dict[str, str], self.r.hgetall(reservations_key(host)))
        return sum(int(v) for k, v in held.items() if k != excluding)

    # --- events -----------------------------------------------------------------------------

    def append_event(self, job_id: str, event: dict[str, Any]) -> str:
        return str(
            self.r.xadd(
                events_key(job_id),
                {EVENT_FIELD: json.dumps(event, default=str)},
                maxlen=self.event_maxlen,
                approximate=True,
            )
        )

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id `after`; with `block_ms`, wait up to that long for new ones."""
        if block_ms is None:
            start = f"({after}" if after != "0-0" else "-"
            rows = cast(
                list[tuple[str, dict[str, str]]], self.r.xrange(events_key(job_id), min=start)
            )
            return [(eid, json.loads(f[EVENT_FIELD])) for eid, f in rows]
        got = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            self.r.xread({events_key(job_id): after}, block=block_ms, count=EVENT_READ_BATCH),
        )
        return [(eid, json.loads(f[EVENT_FIELD])) for _, rows in got for eid, f in rows]

    def follow_events(
        self,
        job_id: str,
        ended: Callable[[], bool] | None = None,
        *,
        block_ms: int = 1000,
        timeout: float | None = None,
        guard: Guard = direct,
    ) -> Iterator[dict[str, Any]]:
        """Every event of the job, old then new, until it has `ended` and its stream is drained.

        With `timeout`, TimeoutError once that many seconds have passed without an end.
        Every Redis call goes through `guard` (a follower riding out an outage, say); the
        stream is read on from the last event seen, so nothing is skipped or repeated.
        """
        is_ended = ended or (lambda: self.state(job_id) in TERMINAL)
        deadline = None if timeout is None else time.monotonic() + timeout
        last = "0-0"
        for eid, ev in guard(partial(self.read_events, job_id)):
            last = eid
            yield ev
        while True:
            batch = guard(partial(self.read_events, job_id, after=last, block_ms=block_ms))
            for eid, ev in batch:
                last = eid
                yield ev
            if deadline is not None and time.monotonic() > deadline and not guard(is_ended):
                raise TimeoutError(f"job {job_id} has not ended after {timeout:g}s")
            if not batch and guard(is_ended):
                # One last non-blocking read: the terminal event may land just after the state.
                for eid, ev in guard(partial(self.read_events, job_id, after=last)):
                    last = eid
                    yield ev
                return
