"""The tunables: timings and sizes of the whole fleet, `[tunables]` in drover.toml.

Apart from the registry's model (config/settings_model.py), which uses them.

Every number is finite (`inf` and `nan` are refused), and a duration whose huge value would
mean "never" (a timeout, an interval, an outage ridden out) has an upper bound an operator
would not want to exceed: at most a day for what a command or a duty waits on, a week for a
migration or a message's life.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The phases of a migration, in order (jobs/phases.py PHASE_ORDER: the config layer cannot
# import it; tests/unit/test_tunables_checked.py holds the two equal). Those a phase_retries
# entry may name: the ones that change nothing before reaching their libvirtd (jobs/phases.py
# PhaseRule.retryable); perform is never tried again.
PHASE_NAMES = ("source_preflight", "destination_prepare", "perform", "finish", "confirm")
RETRYABLE_PHASES = ("source_preflight", "destination_prepare", "finish", "confirm")

MINUTE_S = 60.0
HOUR_S = 3_600.0
DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
MAX_PHASE_RETRIES = 20
# A phase held open by the fault-injection suite ([faults] phase_delays) at most this long.
MAX_PHASE_DELAY_S = HOUR_S

Retries = Annotated[int, Field(ge=0, le=MAX_PHASE_RETRIES)]


def phase_name_problem(name: str, allowed: tuple[str, ...] = PHASE_NAMES) -> str | None:
    """Why `name` is not a phase a table may name (None: it is one)."""
    if name in allowed:
        return None
    if name in PHASE_NAMES:
        return f"{name!r} is never tried again (phases: {', '.join(allowed)})"
    return f"{name!r} is not a phase (phases: {', '.join(allowed)})"


class Tunables(BaseModel):
    """Timings and sizes. Seconds unless the name says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    progress_interval: float = Field(default=1.0, gt=0, le=10)
    # How often the monitor samples a running migration for its policy's decisions (a switch
    # to post-copy follows the end of a pass within this); reports stay once per interval.
    decision_interval: float = Field(default=0.05, gt=0, le=10)
    # A phase's time limit (at most a day); the migration itself ends at `migration_timeout`
    # whatever its policy (at most a week: a huge guest and its disks over a slow link).
    phase_timeout: float = Field(default=60, gt=0, le=DAY_S)
    migration_timeout: float = Field(default=1800, gt=0, le=WEEK_S)
    # Longest blocking read on a job's stream while waiting; the state is re-checked this often.
    wait_block: float = Field(default=1.0, gt=0, le=60)
    event_stream_maxlen: int = Field(default=10_000, ge=100, le=10_000_000)
    # A finished job's (or evacuation's) keys expire this long after its end, and the
    # listing indexes drop it this long after its creation (jobs/retention.py).
    job_retention_days: int = Field(default=30, ge=1, le=3650)
    worker_concurrency: int = Field(default=8, ge=2, le=64)
    # Liveness and recovery. A worker beats every `heartbeat_interval` (at most a minute, and
    # shorter than `heartbeat_ttl` and `host_facts_ttl`, or they would lapse between beats);
    # its heartbeat lives `heartbeat_ttl`; a job whose next step belongs to a host without one
    # for `stall_after` is marked stalled; a step that should have started `redispatch_after`
    # ago is sent again (phase claims drop duplicates).
    heartbeat_interval: float = Field(default=2.0, gt=0, le=MINUTE_S)
    heartbeat_ttl: float = Field(default=10.0, gt=0, le=HOUR_S)
    # A warm shutdown (SIGTERM) waits this long for a running migration; then a peer-to-peer
    # one is handed over to the next worker (libvirtd carries on without its client) and any
    # other is aborted (it cannot outlive this process). Keep the service manager's stop
    # timeout longer than this (docker-compose.yml: stop_grace_period).
    drain_timeout: float = Field(default=600.0, gt=0, le=DAY_S)
    watchdog_interval: float = Field(default=5.0, gt=0, le=HOUR_S)
    stall_after: float = Field(default=30.0, gt=0, le=DAY_S)
    redispatch_after: float = Field(default=30.0, gt=0, le=DAY_S)
    # How long a worker's Redis commands keep retrying through a Redis outage (a refused
    # connection included), counted from when each command started; producers retry only
    # briefly, so a command line with a dead Redis answers within seconds. At most an hour for
    # a worker, 10 minutes for a producer: longer would look like a hang.
    redis_retry_for: float = Field(default=30.0, ge=0, le=HOUR_S)
    producer_redis_retry_for: float = Field(default=2.0, ge=0, le=10 * MINUTE_S)
    # What must never wait out an outage (the abort check and the progress events of a running
    # migration: libvirt's migration goes on without Redis) tries Redis once, giving up after
    # this long to connect or to hear back.
    redis_probe_timeout: float = Field(default=1.0, gt=0, le=10)
    # Events a worker could not write to their streams are held, in order, and written once
    # Redis answers again (tried this often); past `event_hold_max` the oldest are dropped
    # and the job's stream says how many.
    event_hold_max: int = Field(default=10_000, ge=100, le=10_000_000)
    event_flush_interval: float = Field(default=0.5, gt=0, le=10)
    # `drover migrate --wait`, `drover events --follow` and `Drover.wait` follow a job through
    # a Redis outage this long (a notice says so) before they give up; the job goes on. At
    # most a day.
    wait_redis_outage: float = Field(default=120.0, ge=0, le=DAY_S)
    # Retries of a phase that could not reach its libvirtd (0 to 20, keyed by phase name: an
    # unknown one is refused), and the wait between them (at most 10 minutes). Only phases
    # that change nothing before that check are retried: naming perform is refused.
    phase_retries: dict[str, Retries] = {
        "source_preflight": 3,
        "destination_prepare": 3,
        "finish": 3,
        "confirm": 3,
    }
    retry_delay: float = Field(default=2.0, ge=0, le=10 * MINUTE_S)
    # Tries of a destination's rollback on a fresh libvirt connection when the one it used
    # died (libvirtd restarted during the job), `retry_delay` apart.
    rollback_attempts: int = Field(default=4, ge=1, le=20)
    # Redis redelivers an unacknowledged message after this; drover acks early (docs/celery.md).
    broker_visibility_timeout: float = Field(default=3600.0, gt=0, le=WEEK_S)
    max_message_bytes: int = Field(default=65_536, ge=1024, le=64 * 1024 * 1024)
    # A signed task message is refused this long after it was sent (its body says when), and
    # a worker remembers the nonces it has seen for as long. A phase whose message expired in
    # a long queue is sent again by recovery with a fresh one.
    message_ttl: float = Field(default=900.0, gt=0, le=86_400)
    # A producer's signed request is refused at admission once it is older than this (a job
    # may wait in line a long time behind the limits; a day covers a night's drain).
    request_max_age: float = Field(default=86_400.0, gt=0, le=WEEK_S)
    # Jobs waiting for a concurrency slot are re-examined this often (and at once whenever a
    # job ends); a worker's evacuations are checked for finished children this often.
    admission_interval: float = Field(default=0.5, gt=0, le=MINUTE_S)
    # A host's worker checks its own `max_inbound` (prepare) and `max_outbound` (perform)
    # again, against its ledger and its libvirtd (worker/migration_limits.py). Admission keeps
    # them, so a phase finds its host full only when a Redis write let too many jobs in, or
    # for the moment a failed job's booking waits for its rollback: it waits this long (and
    # looks again every `admission_interval`) before it refuses the job.
    limit_wait: float = Field(default=30.0, ge=0, le=HOUR_S)
    evacuation_check_interval: float = Field(default=0.5, gt=0, le=MINUTE_S)
    # Once every child has ended, an evacuation confirms through each destination's libvirtd
    # where its domains are. One that cannot be asked (restarting, cut off) is asked again at
    # every check for this long; after that the evacuation ends partial and says why.
    evacuation_confirm_wait: float = Field(default=60.0, ge=0, le=3600)
    # Another host's libvirtd must answer the opening of a connection within this, and then
    # each request within about this (keepalive): one cut off or frozen is then unreachable,
    # instead of holding the caller (the keeper's duties for every job, a managed-direct
    # migration's hand-over) for minutes or ever.
    peer_timeout: float = Field(default=15.0, ge=3, le=600)
    # How often an evacuation queues a failed child again when its guest still runs on the
    # host being emptied (a worker restart or a blip cut the migration short).
    evacuation_retries: int = Field(default=1, ge=0, le=10)
    # How long a `drover tune` / `postcopy` / `force-complete` request is good for: a worker
    # that takes it later drops it. Its producer waits that long, plus what a worker that
    # took it in time may wait before it acts (control_setup_wait, control_lock_wait), for
    # the answer (its `policy.step` or `control.refused` event) before saying it got none.
    control_reply_timeout: float = Field(default=15.0, gt=0, le=600)
    # A control request that comes while libvirt still sets the migration up (the destination
    # being prepared) waits this long on the worker for the transfer to begin.
    control_setup_wait: float = Field(default=5.0, gt=0, le=300)
    # A control request for a job another control of which libvirt has not answered yet (a
    # QEMU that stopped answering holds it for libvirt's own 30 s) waits this long, then is
    # refused: each one waiting on would hold one of the worker's threads, which every other
    # job's phases need too (a probe slowed an unrelated migration from 4 s to 83 s so).
    control_lock_wait: float = Field(default=1.0, gt=0, le=60)
    # A worker publishes its Celery task events (for Flower) this long after the first one is
    # buffered, all in one message, rather than at once: at once, the publish fell on the
    # moment a phase hands over (the next one being taken from the queue), and each hop paid
    # for it. Flower shows a task's progress at most this late (config/task_events.py).
    task_event_flush_delay: float = Field(default=0.05, ge=0, le=5)
    # After a migration call returns, how long perform waits for libvirt's job-completed event
    # (the guest's downtime, the final figures) before asking the destination instead.
    completion_event_wait: float = Field(default=2.0, gt=0, le=60)
    # The dry-run's duration estimate per domain: QEMU start-up on the destination plus its
    # memory at this rate (the lab's idle guests move in about 2 s, nearly all start-up).
    estimate_startup_s: float = Field(default=2.0, ge=0, le=HOUR_S)
    estimate_mib_per_s: float = Field(default=100.0, gt=0, le=1_000_000)
    # A post-copy that failed (worker/postcopy_recovery.py) is resumed as soon as the
    # destination answers: first after `postcopy_resume_delay`, the wait doubling after each
    # failed try up to `postcopy_resume_max_delay`. Past `postcopy_recovery_timeout` drover
    # stops trying and the job says where the guest is (paused), keeping its holds.
    postcopy_resume_delay: float = Field(default=1.0, gt=0, le=HOUR_S)
    postcopy_resume_max_delay: float = Field(default=15.0, gt=0, le=HOUR_S)
    postcopy_recovery_timeout: float = Field(default=3600.0, gt=0, le=WEEK_S)
    # A resume libvirt keeps refusing because QEMU says the old stream still runs (a link cut
    # the TCP stream outlived, now stalled) for this long: the stream is interrupted
    # (VIR_DOMAIN_ABORT_JOB_POSTCOPY, as `virsh domjobabort --postcopy`) and resumed after
    # `postcopy_resume_delay`; 0 interrupts it at the first refusal.
    postcopy_stall_timeout: float = Field(default=30.0, ge=0, le=HOUR_S)
    # Host facts (jobs/host_facts.py): each worker publishes its host's inventory every report
    # tick (`heartbeat_interval`) to live this long; the planner refuses a record older than
    # that, or dated more than `host_facts_max_skew` in its future (clocks disagree). The host
    # CPU (libvirt's domain capabilities) is read again this often, or when libvirtd restarts.
    host_facts_ttl: float = Field(default=15.0, gt=0, le=HOUR_S)
    host_facts_max_skew: float = Field(default=5.0, ge=0, le=HOUR_S)
    host_cpu_refresh: float = Field(default=300.0, gt=0, le=DAY_S)
    # Besides the quick admission pass (every `admission_interval`: only the lanes that can
    # move), each worker looks at every lane's head this often, so that a step lost to a
    # crash in the middle of a pass cannot leave a lane waiting for ever.
    admission_safety_interval: float = Field(default=15.0, gt=0, le=HOUR_S)
    # A Sentinel set (docs/sentinel.md): after a job's creation, a phase claim and a state
    # transition the store waits (Redis WAIT) until this many replicas hold the write, at
    # most `redis_wait_ms`; a primary killed then cannot take those writes with it.
    redis_wait_replicas: int = Field(default=1, ge=0, le=5)
    redis_wait_ms: int = Field(default=500, ge=1, le=10_000)
    # A migration's in-flight series (worker exporter, docs/metrics.md) are dropped from a
    # scrape once their last progress sample is this old, even if the worker never saw the
    # job end (another host ended it, a Redis outage cut the story short).
    metrics_stale_after: float = Field(default=120.0, gt=0, le=DAY_S)
    # `drover exporter` (producer/exporter.py): one of any number is active, holding a lease
    # in Redis of `exporter_lease_ttl`, renewed every `exporter_lease_renew` (a standby takes
    # over within the lease once the active one dies). A scrape gives up on Redis after
    # `exporter_redis_timeout` (connect, and each reply) and says Redis is down.
    exporter_lease_ttl: float = Field(default=15.0, gt=0, le=300)
    exporter_lease_renew: float = Field(default=5.0, gt=0, le=300)
    exporter_redis_timeout: float = Field(default=2.0, gt=0, le=10)

    @field_validator("phase_retries")
    @classmethod
    def _retried_phases(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            problem = phase_name_problem(name, RETRYABLE_PHASES)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Tunables:
        """Pairs whose values only make sense one way round: each one's problem in a line."""
        pairs = (
            (
                "exporter_lease_renew",
                "exporter_lease_ttl",
                "the lease would lapse between renewals",
            ),
            (
                "heartbeat_interval",
                "heartbeat_ttl",
                "a live worker's heartbeat would lapse between beats",
            ),
            (
                "heartbeat_interval",
                "host_facts_ttl",
                "a host's facts, published every heartbeat, would lapse between publications",
            ),
        )
        for shorter, longer, why in pairs:
            if getattr(self, shorter) >= getattr(self, longer):
                raise ValueError(f"{shorter} must be shorter than {longer} ({why})")
        if self.postcopy_resume_delay > self.postcopy_resume_max_delay:
            raise ValueError(
                "postcopy_resume_delay must not exceed postcopy_resume_max_delay "
                "(the first wait would be longer than the longest)"
            )
        return self
