"""Retention on a real Redis: a finished job's keys expire `job_retention_days` after its end,
nothing drover writes for a job is left without a time to live once it has ended, shared keys
hold nothing of a finished job, and the listing indexes are trimmed to the retention."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import redis

from config.settings import Settings, load_settings
from jobs.admission import Admission
from jobs.control import TuneRequest, push_tune
from jobs.evacuation import EvacuationSpec, EvacuationState, EvacuationStore
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    CLUSTER_GATE,
    DISABLED_HOSTS,
    EVACUATIONS_INDEX,
    JOBS_BY_HOST_PREFIX,
    JOBS_BY_STATE_PREFIX,
    JOBS_INDEX,
    RESERVATIONS_PREFIX,
    WAITING,
    WAITING_BY_ORIGIN_PREFIX,
    children_key,
    claims_key,
    domain_lock_key,
    evacuation_reported_key,
    evacuation_retries_key,
    events_key,
    heartbeat_key,
    host_report_key,
    job_key,
    jobs_by_host_key,
    jobs_by_state_key,
    phases_key,
    record_keys,
    runner_key,
    transitions_key,
)
from jobs.maintenance import Maintenance
from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.conftest import RedisServer
from tests.support.registry import hosts_toml

DAY_S = 86_400
TOLERANCE_S = 60  # the test's own run time, with a wide margin
REGISTRY = 'redis_url = "{url}"\n[tunables]\njob_retention_days = {days}\n' + hosts_toml(3)
RUN_ORDER = (
    (Phase.SOURCE_PREFLIGHT, "kvm1", JobState.PREFLIGHT),
    (Phase.DESTINATION_PREPARE, "kvm2", JobState.PREPARED),
    (Phase.PERFORM, "kvm1", JobState.MIGRATING),
    (Phase.FINISH, "kvm2", JobState.FINISHING),
    (Phase.CONFIRM, "kvm1", JobState.SUCCEEDED),
)
# Shared keys that may name a finished record: the listing indexes and the evacuations'
# (trimmed by creation time), and a host's maintenance entry (its reason names the evacuation
# that disabled it, kept until `drover host enable`).
MAY_NAME_FINISHED = (
    JOBS_INDEX,
    JOBS_BY_STATE_PREFIX,
    JOBS_BY_HOST_PREFIX,
    EVACUATIONS_INDEX,
    DISABLED_HOSTS,
)


def fleet(tmp_path: Path, redis_srv: RedisServer, days: int = 7) -> Settings:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url, days=days))
    return load_settings(path)


def store_for(settings: Settings) -> JobStore:
    store = JobStore.from_url(
        settings.redis_url, retention_s=settings.tunables.job_retention_days * DAY_S
    )
    store.r.flushdb()
    return store


def run_like_a_worker(store: JobStore, job_id: str, end: JobState = JobState.SUCCEEDED) -> None:
    """What the workers write for one migration: claims, runner marks, phase records, a
    UUID lease, a reservation, events and state transitions, up to `end`."""
    for phase, host, state in RUN_ORDER:
        assert store.claim_phase(job_id, phase.value, host)
        assert store.take_runner(job_id, phase.value, f"w@{host}", 30) is None
        store.phase_started(job_id, phase.value, host)
        store.append_event(job_id, {"event": "phase.started", "phase": phase.value})
        if phase is Phase.SOURCE_PREFLIGHT:
            assert store.take_lease(domain_lock_key("uuid", f"uuid-{job_id}"), job_id) is None
        if phase is Phase.DESTINATION_PREPARE:
            assert store.reserve("kvm2", job_id, 512)
        final = end if state is JobState.SUCCEEDED else state
        assert store.transition(job_id, final, host=host)[0]
        store.append_event(job_id, {"event": "job.state", "state": final.value})
        store.phase_ended(job_id, phase.value)
        store.drop_runner(job_id, phase.value, f"w@{host}")
        if final is not state:
            return


def late_writes(store: JobStore, job_id: str) -> None:
    """What can still reach a job after its end: a late event, a phase ended late, a
    redelivered claim, a runner mark renewed, a tune request, a lease after the end."""
    store.append_event(job_id, {"event": "late"})
    store.phase_ended(job_id, Phase.CONFIRM.value, error="late")
    store.claim_phase(job_id, "late_phase", "kvm1")
    store.renew_runner(job_id, Phase.PERFORM.value, "w@kvm1", 30)
    push_tune(store.r, job_id, "late-task", TuneRequest(bandwidth_mib=10), 60)
    assert store.take_lease(domain_lock_key("uuid", "late-uuid"), job_id) == job_id


def names_any(r: redis.Redis, key: str, ids: set[str]) -> set[str]:
    """Which of `ids` the key holds as a member, field or value."""
    kind = r.type(key)
    if kind == "string":
        found = {cast(str, r.get(key))}
    elif kind == "set":
        found = cast(set[str], r.smembers(key))
    elif kind == "zset":
        found = set(cast(list[str], r.zrange(key, 0, -1)))
    elif kind == "hash":
        raw = cast(dict[str, str], r.hgetall(key))
        found = set(raw) | set(raw.values())
    elif kind == "list":
        found = set(cast(list[str], r.lrange(key, 0, -1)))
    else:
        found = set()
    return {i for i in ids if any(i in item for item in found)}


def test_nothing_of_a_finished_job_or_evacuation_is_left_without_a_time_to_live(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    settings = fleet(tmp_path, redis_srv)
    store = store_for(settings)
    evacuations = EvacuationStore(store)
    admission = Admission(store)
    store.heartbeat("kvm1", 30, "w@kvm1")
    store.report_host("kvm1", {"free_mib": 1}, 30)

    plain = enqueue(store, MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), origin="p1")
    aborted = enqueue(store, MigrationSpec(domain="web02", src="kvm1", dst="kvm2"), origin="p1")
    ev = evacuations.create(EvacuationSpec(host="kvm1", max_parallel=2), "p1")
    Maintenance(store.r).disable("kvm1", f"evacuation {ev}", by="p1")
    evacuations.transition(ev, EvacuationState.PLANNING)
    evacuations.transition(ev, EvacuationState.RUNNING)
    children = [
        enqueue(
            store,
            MigrationSpec(domain=f"guest{n}", src="kvm1", dst="kvm2", live=True),
            origin="kvm1",
            parent=ev,
            parent_limit=2,
            reserve_mib=256,
        )
        for n in range(2)
    ]
    admission.safety_pass(settings, lambda job_id, spec: None)
    assert store.r.smembers(CLUSTER_GATE)  # slots are held while the jobs live

    run_like_a_worker(store, plain)
    assert store.transition(aborted, JobState.CANCELLED, host="p1")[0]
    run_like_a_worker(store, children[0])
    run_like_a_worker(store, children[1], end=JobState.FAILED)
    assert evacuations.take_retry(ev, "guest1", 1)
    for child in children:
        assert evacuations.mark_reported(ev, child)
    assert evacuations.may_redispatch(ev, 30)
    assert evacuations.transition(ev, EvacuationState.PARTIAL)[0]
    store.append_event(ev, {"event": "evacuation.state", "state": "partial"})
    for job_id in (plain, *children):
        late_writes(store, job_id)
    assert evacuations.mark_reported(ev, "late-child")  # after the evacuation's end

    finished = {plain, aborted, ev, *children}
    own = {key: job_id for job_id in finished for key in record_keys(job_id)}
    retention = settings.tunables.job_retention_days * DAY_S
    unexplained = []
    for key in cast(list[str], list(store.r.scan_iter(count=1000))):
        ttl = cast(int, store.r.ttl(key))
        if key in own:  # a tune request keeps its own, shorter, time to live
            assert 0 < ttl <= retention, (key, ttl)
            continue
        if ttl > 0:
            continue  # runner marks, tune requests, the redispatch mark, heartbeats, reports
        assert ttl == -1
        if key.startswith(MAY_NAME_FINISHED):
            continue
        if names_any(store.r, key, finished):
            unexplained.append(key)
    assert unexplained == []
    for job_id in finished:
        kept = [events_key(job_id), job_key(job_id)]
        if job_id != ev:
            kept.append(transitions_key(job_id))
        if job_id in (plain, *children):
            kept += [phases_key(job_id), claims_key(job_id)]
        for key in kept:
            ttl = cast(int, store.r.ttl(key))
            assert retention - TOLERANCE_S <= ttl <= retention, (key, ttl)
    for key in (children_key(ev), evacuation_retries_key(ev), evacuation_reported_key(ev)):
        ttl = cast(int, store.r.ttl(key))
        assert retention - TOLERANCE_S <= ttl <= retention, (key, ttl)
    # What a finished record must be out of, and what it must be in.
    for key in (ACTIVE_JOBS, ACTIVE_EVACUATIONS, WAITING, CLUSTER_GATE):
        assert not names_any(store.r, key, finished), key
    assert not store.r.keys(f"{RESERVATIONS_PREFIX}*")  # emptied hashes are gone
    assert not store.r.keys(f"{WAITING_BY_ORIGIN_PREFIX}*")
    assert not store.r.keys("drover:lock:*")
    assert cast(int, store.r.ttl(runner_key(plain, Phase.PERFORM.value))) > 0  # its own
    assert set(cast(list[str], store.r.zrange(jobs_by_state_key("succeeded"), 0, -1))) == {
        plain,
        children[0],
    }
    assert store.r.zscore(jobs_by_state_key("partial"), ev) is not None
    assert store.r.zscore(jobs_by_host_key("kvm1"), ev) is not None
    assert store.r.exists(heartbeat_key("kvm1"), host_report_key("kvm1")) == 2


def test_index_entries_older_than_the_retention_are_trimmed_when_a_record_ends(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    settings = fleet(tmp_path, redis_srv, days=1)
    store = store_for(settings)
    old = enqueue(store, MigrationSpec(domain="old", src="kvm1", dst="kvm2"), origin="p")
    store.transition(old, JobState.FAILED, host="p", reason="x")
    # As if it had been created two days ago: every index scores by creation time.
    two_days_ago = cast(float, store.r.zscore(JOBS_INDEX, old)) - 2 * DAY_S
    indexes = [JOBS_INDEX, jobs_by_state_key("failed"), jobs_by_host_key("kvm1")]
    for key in [*indexes, jobs_by_host_key("kvm2")]:
        store.r.zadd(key, {old: two_days_ago})
    recent = enqueue(store, MigrationSpec(domain="new", src="kvm1", dst="kvm3"), origin="p")
    assert store.r.zscore(JOBS_INDEX, old) is not None  # nothing trims before an end

    store.transition(recent, JobState.FAILED, host="p", reason="x")

    for key in indexes:
        assert store.r.zscore(key, old) is None, key
        assert store.r.zscore(key, recent) is not None, key
    # kvm2's index had no end since: trimmed later, and never read past the retention.
    assert store.r.zscore(jobs_by_host_key("kvm2"), old) is not None
    from jobs.listing import JobFilter, recent_ids

    now_s = cast(float, store.r.zscore(JOBS_INDEX, recent)) + 1
    listed = recent_ids(store.r, JobFilter(host="kvm2"), 10, now_s=now_s, retention_s=DAY_S)
    assert listed == []
