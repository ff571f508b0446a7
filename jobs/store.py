"""The store producers and workers share: one object over the three concerns kept in Redis.

- job records and their one transition script (jobs/records.py, jobs/transition.py),
- leases and liveness: domain leases, phase runners, reservations, heartbeats, host reports
  and draining marks (jobs/liveness.py),
- event streams (jobs/streams.py), followed by jobs/follow.py.

Every key they use is named in jobs/keys.py; the names re-exported here are for callers that
import them from the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import redis

from config.redis_sentinel import is_sentinel
from config.settings import Settings
from config.tunables import Tunables
from jobs.connection import OUTAGE_ERRORS, Guard, OutageRetry, client_for, direct
from jobs.follow import DEFAULT_BLOCK_MS, follow
from jobs.keys import (
    ACTIVE_JOBS,
    EVENT_FIELD,
    JOBS_INDEX,
    KEY_PREFIX,
    POSTCOPY_FIELD,
    WAITING,
    children_key,
    domain_lock_key,
    draining_key,
    events_key,
    heartbeat_key,
    host_report_key,
    job_key,
    redispatched_field,
    reservations_key,
    runner_key,
)
from jobs.liveness import Liveness
from jobs.model import PhaseRecord
from jobs.record import JobNotFound
from jobs.record_marks import now
from jobs.records import JobRecords
from jobs.replication import NO_WAIT, ReplicaWait
from jobs.retention import Retention, retention_seconds
from jobs.states import TERMINAL, JobState
from jobs.streams import DEFAULT_EVENT_MAXLEN, EventStreams, Skipped

# A store made without settings keeps records as long as the default `job_retention_days`.
DEFAULT_RETENTION_S = retention_seconds(Tunables().job_retention_days)

__all__ = [
    "ACTIVE_JOBS",
    "EVENT_FIELD",
    "JOBS_INDEX",
    "KEY_PREFIX",
    "OUTAGE_ERRORS",
    "POSTCOPY_FIELD",
    "WAITING",
    "Guard",
    "JobNotFound",
    "JobStore",
    "OutageRetry",
    "children_key",
    "direct",
    "domain_lock_key",
    "draining_key",
    "events_key",
    "heartbeat_key",
    "host_report_key",
    "job_key",
    "now",
    "redispatched_field",
    "reservations_key",
    "runner_key",
]


def replica_wait_for(url: str, tunables: Tunables | None = None) -> ReplicaWait:
    """WAIT on a Sentinel set (as `tunables` say, else their defaults), nothing on a single
    server."""
    if not is_sentinel(url):
        return NO_WAIT
    tunables = tunables or Tunables()
    return ReplicaWait(tunables.redis_wait_replicas, tunables.redis_wait_ms)


class JobStore(JobRecords, Liveness, EventStreams):
    def __init__(
        self,
        client: redis.Redis,
        *,
        event_maxlen: int = DEFAULT_EVENT_MAXLEN,
        retention_s: int = DEFAULT_RETENTION_S,
        without_retry: JobStore | None = None,
    ) -> None:
        retention = Retention(client, retention_s)
        JobRecords.__init__(self, client, retention)
        Liveness.__init__(self, client)
        EventStreams.__init__(self, client, event_maxlen=event_maxlen)
        self._without_retry = without_retry

    @classmethod
    def from_settings(
        cls, settings: Settings, *, retry_for: float, probe_timeout: float | None = None
    ) -> JobStore:
        """The store of a worker or producer: `from_url` as the settings' tunables say (event
        stream length, retention, the replica WAIT on a Sentinel set)."""
        tunables = settings.tunables
        store = cls.from_url(
            settings.redis_url,
            event_maxlen=tunables.event_stream_maxlen,
            retention_s=retention_seconds(tunables.job_retention_days),
            retry_for=retry_for,
            probe_timeout=probe_timeout,
        )
        wait = replica_wait_for(settings.redis_url, tunables)
        store.replica_wait = wait
        if store._without_retry is not None:
            store._without_retry.replica_wait = wait
        return store

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        event_maxlen: int = DEFAULT_EVENT_MAXLEN,
        retention_s: int = DEFAULT_RETENTION_S,
        retry_for: float = 0.0,
        probe_timeout: float | None = None,
    ) -> JobStore:
        """A store on `url`; with `retry_for`, each command rides out a Redis outage that long
        (OutageRetry), and `without_retry` is the same store failing at once instead.

        `probe_timeout` bounds the connect and each reply of that store without retries (or
        of this one, without `retry_for`): a server that does not answer is an outage too.
        On a Sentinel set the store WAITs for a replica after the writes that matter
        (jobs/replication.py).
        """
        client = client_for(url, retry_for=retry_for, probe_timeout=probe_timeout)
        if retry_for <= 0:
            store = cls(client, event_maxlen=event_maxlen, retention_s=retention_s)
        else:
            once = cls.from_url(
                url, event_maxlen=event_maxlen, retention_s=retention_s, probe_timeout=probe_timeout
            )
            store = cls(
                client, event_maxlen=event_maxlen, retention_s=retention_s, without_retry=once
            )
        store.replica_wait = replica_wait_for(url)
        return store

    @property
    def without_retry(self) -> JobStore:
        """This store for a caller that must not wait out an outage: one try, then the error.

        The monitor of a running migration checks for an abort and publishes its progress
        through it, so that libvirt's migration is watched whether Redis answers or not.
        """
        return self._without_retry or self

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        host: str,
        reason: str | None = None,
        only_from: JobState | None = None,
    ) -> tuple[bool, JobState | None]:
        """JobRecords.transition; once the job has ended, its domain leases are given back
        too (its slots, reservations and active mark went in the transition itself)."""
        moved, previous = super().transition(
            job_id, target, host=host, reason=reason, only_from=only_from
        )
        if moved and target in TERMINAL:
            self.release_leases(job_id)
        return moved, previous

    def end_phase_entering(
        self, job_id: str, phase: str, started: PhaseRecord | None, target: JobState, *, host: str
    ) -> tuple[bool, JobState | None]:
        """JobRecords.end_phase_entering; the domain leases given back as `transition` does."""
        moved, previous = super().end_phase_entering(job_id, phase, started, target, host=host)
        if moved and target in TERMINAL:
            self.release_leases(job_id)
        return moved, previous

    def follow_events(
        self,
        job_id: str,
        ended: Callable[[], bool] | None = None,
        *,
        block_ms: int = DEFAULT_BLOCK_MS,
        timeout: float | None = None,
        guard: Guard = direct,
        skipped: Skipped | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every event of the job, old then new, until it has ended (jobs/follow.py); each
        stream entry that is no event is passed over and told to `skipped`."""
        is_ended = ended or (lambda: self.state(job_id) in TERMINAL)
        for _, event in follow(
            self,
            job_id,
            is_ended,
            block_ms=block_ms,
            timeout=timeout,
            guard=guard,
            skipped=skipped,
        ):
            yield event
