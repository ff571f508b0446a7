"""The tunables: timings and sizes of the whole fleet, `[tunables]` in drover.toml.

Apart from the registry's model (config/settings_model.py), which uses them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Tunables(BaseModel):
    """Timings and sizes. Seconds unless the name says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    progress_interval: float = Field(default=1.0, gt=0, le=10)
    # How often the monitor samples a running migration for its policy's decisions (a switch
    # to post-copy follows the end of a pass within this); reports stay once per interval.
    decision_interval: float = Field(default=0.05, gt=0, le=10)
    phase_timeout: float = Field(default=60, gt=0)
    migration_timeout: float = Field(default=1800, gt=0)
    # Longest blocking read on a job's stream while waiting; the state is re-checked this often.
    wait_block: float = Field(default=1.0, gt=0, le=60)
    event_stream_maxlen: int = Field(default=10_000, ge=100)
    # A finished job's (or evacuation's) keys expire this long after its end, and the
    # listing indexes drop it this long after its creation (jobs/retention.py).
    job_retention_days: int = Field(default=30, ge=1)
    worker_concurrency: int = Field(default=8, ge=2, le=64)
    # Liveness and recovery. A worker's heartbeat lives `heartbeat_ttl`; a job whose next
    # step belongs to a host without one for `stall_after` is marked stalled; a step that
    # should have started `redispatch_after` ago is sent again (phase claims drop duplicates).
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_ttl: float = Field(default=10.0, gt=0)
    # A warm shutdown (SIGTERM) waits this long for a running migration; then a peer-to-peer
    # one is handed over to the next worker (libvirtd carries on without its client) and any
    # other is aborted (it cannot outlive this process). Keep the service manager's stop
    # timeout longer than this (docker-compose.yml: stop_grace_period).
    drain_timeout: float = Field(default=600.0, gt=0)
    watchdog_interval: float = Field(default=5.0, gt=0)
    stall_after: float = Field(default=30.0, gt=0)
    redispatch_after: float = Field(default=30.0, gt=0)
    # How long a worker's Redis commands keep retrying through a Redis outage (a refused
    # connection included), counted from when each command started; producers retry only
    # briefly, so a command line with a dead Redis answers within seconds.
    redis_retry_for: float = Field(default=30.0, ge=0)
    producer_redis_retry_for: float = Field(default=2.0, ge=0)
    # What must never wait out an outage (the abort check and the progress events of a running
    # migration: libvirt's migration goes on without Redis) tries Redis once, giving up after
    # this long to connect or to hear back.
    redis_probe_timeout: float = Field(default=1.0, gt=0, le=10)
    # Events a worker could not write to their streams are held, in order, and written once
    # Redis answers again (tried this often); past `event_hold_max` the oldest are dropped
    # and the job's stream says how many.
    event_hold_max: int = Field(default=10_000, ge=100)
    event_flush_interval: float = Field(default=0.5, gt=0, le=10)
    # `drover migrate --wait`, `drover events --follow` and `Drover.wait` follow a job through
    # a Redis outage this long (a notice says so) before they give up; the job goes on.
    wait_redis_outage: float = Field(default=120.0, ge=0)
    # Retries of a phase that could not reach its libvirtd, and the wait between them. Only
    # phases that change nothing before that check are retried; perform never is.
    phase_retries: dict[str, int] = {
        "source_preflight": 3,
        "destination_prepare": 3,
        "finish": 3,
        "confirm": 3,
    }
    retry_delay: float = Field(default=2.0, ge=0)
    # Tries of a destination's rollback on a fresh libvirt connection when the one it used
    # died (libvirtd restarted during the job), `retry_delay` apart.
    rollback_attempts: int = Field(default=4, ge=1, le=20)
    # Redis redelivers an unacknowledged message after this; drover acks early (docs/celery.md).
    broker_visibility_timeout: float = Field(default=3600.0, gt=0)
    max_message_bytes: int = Field(default=65_536, ge=1024)
    # A signed task message is refused this long after it was sent (its body says when), and
    # a worker remembers the nonces it has seen for as long. A phase whose message expired in
    # a long queue is sent again by recovery with a fresh one.
    message_ttl: float = Field(default=900.0, gt=0, le=86_400)
    # A producer's signed request is refused at admission once it is older than this (a job
    # may wait in line a long time behind the limits; a day covers a night's drain).
    request_max_age: float = Field(default=86_400.0, gt=0)
    # Jobs waiting for a concurrency slot are re-examined this often (and at once whenever a
    # job ends); a worker's evacuations are checked for finished children this often.
    admission_interval: float = Field(default=0.5, gt=0)
    evacuation_check_interval: float = Field(default=0.5, gt=0)
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
    # `drover tune` / `force-complete` wait this long for the source worker's answer (its
    # `policy.step` or `control.refused` event) before saying they got none.
    control_reply_timeout: float = Field(default=15.0, gt=0, le=600)
    # A control request that comes while libvirt still sets the migration up (the destination
    # being prepared) waits this long on the worker for the transfer to begin.
    control_setup_wait: float = Field(default=5.0, gt=0, le=300)
    # After a migration call returns, how long perform waits for libvirt's job-completed event
    # (the guest's downtime, the final figures) before asking the destination instead.
    completion_event_wait: float = Field(default=2.0, gt=0, le=60)
    # The dry-run's duration estimate per domain: QEMU start-up on the destination plus its
    # memory at this rate (the lab's idle guests move in about 2 s, nearly all start-up).
    estimate_startup_s: float = Field(default=2.0, ge=0)
    estimate_mib_per_s: float = Field(default=100.0, gt=0)
    # A post-copy that failed (worker/postcopy_recovery.py) is resumed as soon as the
    # destination answers: first after `postcopy_resume_delay`, the wait doubling after each
    # failed try up to `postcopy_resume_max_delay`. Past `postcopy_recovery_timeout` drover
    # stops trying and the job says where the guest is (paused), keeping its holds.
    postcopy_resume_delay: float = Field(default=1.0, gt=0)
    postcopy_resume_max_delay: float = Field(default=15.0, gt=0)
    postcopy_recovery_timeout: float = Field(default=3600.0, gt=0)
    # A resume libvirt keeps refusing because QEMU says the old stream still runs (a link cut
    # the TCP stream outlived, now stalled) for this long: the stream is interrupted
    # (VIR_DOMAIN_ABORT_JOB_POSTCOPY, as `virsh domjobabort --postcopy`) and resumed after
    # `postcopy_resume_delay`; 0 interrupts it at the first refusal.
    postcopy_stall_timeout: float = Field(default=30.0, ge=0)
    # Host facts (jobs/host_facts.py): each worker publishes its host's inventory every report
    # tick (`heartbeat_interval`) to live this long; the planner refuses a record older than
    # that, or dated more than `host_facts_max_skew` in its future (clocks disagree). The host
    # CPU (libvirt's domain capabilities) is read again this often, or when libvirtd restarts.
    host_facts_ttl: float = Field(default=15.0, gt=0)
    host_facts_max_skew: float = Field(default=5.0, ge=0)
    host_cpu_refresh: float = Field(default=300.0, gt=0)
    # Besides the quick admission pass (every `admission_interval`: only the lanes that can
    # move), each worker looks at every lane's head this often, so that a step lost to a
    # crash in the middle of a pass cannot leave a lane waiting for ever.
    admission_safety_interval: float = Field(default=15.0, gt=0)
    # A Sentinel set (docs/sentinel.md): after a job's creation, a phase claim and a state
    # transition the store waits (Redis WAIT) until this many replicas hold the write, at
    # most `redis_wait_ms`; a primary killed then cannot take those writes with it.
    redis_wait_replicas: int = Field(default=1, ge=0, le=5)
    redis_wait_ms: int = Field(default=500, ge=1, le=10_000)
    # A migration's in-flight series (worker exporter, docs/metrics.md) are dropped from a
    # scrape once their last progress sample is this old, even if the worker never saw the
    # job end (another host ended it, a Redis outage cut the story short).
    metrics_stale_after: float = Field(default=120.0, gt=0)
    # `drover exporter` (producer/exporter.py): one of any number is active, holding a lease
    # in Redis of `exporter_lease_ttl`, renewed every `exporter_lease_renew` (a standby takes
    # over within the lease once the active one dies). A scrape gives up on Redis after
    # `exporter_redis_timeout` (connect, and each reply) and says Redis is down.
    exporter_lease_ttl: float = Field(default=15.0, gt=0, le=300)
    exporter_lease_renew: float = Field(default=5.0, gt=0, le=300)
    exporter_redis_timeout: float = Field(default=2.0, gt=0, le=10)

    @model_validator(mode="after")
    def _exporter_renews_within_its_lease(self) -> Tunables:
        if self.exporter_lease_renew >= self.exporter_lease_ttl:
            raise ValueError(
                "exporter_lease_renew must be shorter than exporter_lease_ttl "
                "(the lease would lapse between renewals)"
            )
        return self
