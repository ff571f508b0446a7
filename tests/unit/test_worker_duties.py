"""A worker's background duties outlive bad config and errors; phases are owned by worker
identity; leases last as long as their job; a draining worker's policy (issue 11)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from config.settings import ConfigError, _Cache
from jobs.admission_head import gate_names
from jobs.phases import Phase
from jobs.spec import ControlFlow, MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, domain_lock_key, runner_key
from producer.render import worker_cell
from tests.support.lab_fixtures import wait_for
from tests.unit.test_recovery_step import InlineThread
from tests.unit.test_settings import GOOD
from worker import keeper, recovery
from worker.recovery import _quiet_s, _recover_in_background, current_step
from worker.runtime import Runtime
from worker.steering import drain_action

SPEC = MigrationSpec.model_validate({"domain": "web01", "src": "kvm1", "dst": "kvm2"})


def runtime(store: JobStore, host: str = "kvm1") -> Runtime:
    return Runtime(host=host, store=store, libvirt=cast(Any, None), ledger=cast(Any, None))


# --- a config file saved with a typo -------------------------------------------------------


def test_a_bad_config_file_keeps_the_last_good_settings_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "drover.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("DROVER_CONFIG", str(path))
    cache = _Cache()
    good = cache.get()
    assert cache.problem() is None

    path.write_text(GOOD + "\n[tunables\nheartbeat_ttl = ")  # saved mid-edit
    os.utime(path, (1, 1))  # a new mtime even within the filesystem's resolution
    assert cache.get() is good
    problem = cache.problem()
    assert problem is not None and "not valid TOML" in problem and str(path) in problem

    path.write_text(GOOD + "\n[tunables]\nheartbeat_ttl = 7\n")  # fixed
    os.utime(path, (2, 2))
    assert cache.get().tunables.heartbeat_ttl == 7
    assert cache.problem() is None


def test_a_config_file_rewritten_in_place_is_never_read_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten in place is truncated first, then written, both maybe within one tick
    of the filesystem's clock. Read in between, it is empty: valid TOML, with no hosts, which
    the worker must not take for its settings; and the write that follows must be read
    although its modification time is the same."""
    path = tmp_path / "drover.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("DROVER_CONFIG", str(path))
    cache = _Cache()
    good = cache.get()
    tick = path.stat().st_mtime_ns + 1_000_000_000

    path.write_text("")  # truncated: the write has not come yet
    os.utime(path, ns=(tick, tick))
    assert cache.get() is good and good.hosts
    problem = cache.problem()
    assert problem is not None and "empty" in problem and str(path) in problem

    path.write_text(GOOD + "\n[tunables]\nheartbeat_ttl = 7\n")  # written, in the same tick
    os.utime(path, ns=(tick, tick))
    assert cache.get().tunables.heartbeat_ttl == 7
    assert cache.problem() is None


def test_a_process_with_no_good_settings_yet_still_refuses_a_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "drover.toml"
    path.write_text("redis_url = ")
    monkeypatch.setenv("DROVER_CONFIG", str(path))
    with pytest.raises(ConfigError, match="not valid TOML"):
        _Cache().get()


def test_a_keeper_outlives_any_error_in_its_duties(store: JobStore) -> None:
    rt = runtime(store)
    calls: list[int] = []

    def failing(_: Runtime) -> None:
        calls.append(1)
        raise RuntimeError("a bug in one pass")

    duty = keeper.Duty("failing", lambda _t: 0.01, failing)
    worker = keeper.Keeper(rt, "test-keeper", [duty])
    worker.start()
    try:
        wait_for(lambda: len(calls) >= 3, 10, "the duty to run again after failing")
        assert worker.is_alive(), "the keeper died of its duty's error"
    finally:
        worker.stop.set()
        worker.wake.set()
        worker.join(timeout=5)
    assert not worker.is_alive(), "the keeper did not stop when told"


# --- leases ---------------------------------------------------------------------------------


def test_a_domain_lease_lasts_as_long_as_its_job_and_no_longer(store: JobStore) -> None:
    first = store.create(SPEC, host="cli")
    key = domain_lock_key("name", "web01")
    assert store.take_lease(key, first) is None
    assert store.r.pttl(key) == -1  # no expiry: nothing can run out under a live migration
    second = store.create(SPEC, host="cli")
    assert store.take_lease(key, second) == first
    store.transition(first, JobState.CANCELLED, host="cli", reason="aborted")
    assert store.take_lease(key, second) is None  # its holder ended: taken over


# --- phases owned by worker identity ---------------------------------------------------------


def test_a_phase_mark_belongs_to_one_worker_until_it_is_dropped_or_lapses(
    store: JobStore,
) -> None:
    job_id = store.create(SPEC, host="cli")
    assert store.take_runner(job_id, "perform", "old", 30) is None
    assert store.take_runner(job_id, "perform", "new", 30) == "old"
    assert store.take_runner(job_id, "perform", "old", 30) is None  # its own: renewed
    store.drop_runner(job_id, "perform", "new")  # not the holder: nothing happens
    assert store.runner(job_id, "perform") == "old"
    store.drop_runner(job_id, "perform", "old")
    assert store.take_runner(job_id, "perform", "new", 0.2) is None
    wait_for(lambda: store.runner(job_id, "perform") is None, 5, "the mark to lapse")
    assert store.r.get(runner_key(job_id, "perform")) is None


def test_a_mark_lost_in_a_redis_outage_is_put_back_but_never_over_another(
    store: JobStore,
) -> None:
    job_id = store.create(SPEC, host="cli")
    assert store.take_runner(job_id, "perform", "old", 30) is None
    store.r.delete(runner_key(job_id, "perform"))  # lapsed while Redis was away
    assert store.renew_runner(job_id, "perform", "old", 30)
    assert store.runner(job_id, "perform") == "old"
    assert not store.renew_runner(job_id, "perform", "new", 30)
    assert store.runner(job_id, "perform") == "old"


def test_one_call_renews_every_mark_puts_back_a_lapsed_one_and_never_takes_another(
    store: JobStore,
) -> None:
    jobs = [
        store.create(SPEC.model_copy(update={"domain": f"web{i}"}), host="cli") for i in range(3)
    ]
    mine, lapsed, theirs = ((job_id, "perform") for job_id in jobs)
    assert store.take_runner(*mine, "me", 30) is None
    assert store.take_runner(*theirs, "other", 30) is None
    store.r.pexpire(runner_key(*mine), 500)  # close to lapsing: the renewal extends it
    assert store.renew_runners([mine, lapsed, theirs], "me", 30) == [theirs]
    assert store.runner(*mine) == "me" and store.r.pttl(runner_key(*mine)) > 500
    assert store.runner(*lapsed) == "me"  # lapsed in an outage: put back
    assert store.runner(*theirs) == "other"
    assert store.renew_runners([], "me", 30) == []


def test_recovery_leaves_alone_a_phase_another_live_worker_of_the_host_runs(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    recovered: list[str] = []
    monkeypatch.setattr(recovery, "_recover", lambda rt, job, phase: recovered.append(rt.worker_id))
    monkeypatch.setattr(threading, "Thread", InlineThread)
    draining, beside = runtime(store), runtime(store)
    job_id = store.create(SPEC, host="cli")
    store.phase_started(job_id, Phase.SOURCE_PREFLIGHT.value, "kvm1")
    assert draining.begin(job_id, Phase.SOURCE_PREFLIGHT.value) is None

    _recover_in_background(beside, store.get(job_id), Phase.SOURCE_PREFLIGHT)
    assert recovered == []  # the draining worker still runs it
    draining.end(job_id, Phase.SOURCE_PREFLIGHT.value)
    _recover_in_background(beside, store.get(job_id), Phase.SOURCE_PREFLIGHT)
    assert recovered == [beside.worker_id]
    assert store.runner(job_id, Phase.SOURCE_PREFLIGHT.value) is None  # given back after


def test_a_resent_step_waits_its_back_off_again(store: JobStore) -> None:
    rt = runtime(store)
    job_id = store.create(SPEC, host="cli")
    store.r.hset(f"drover:job:{job_id}", "admitted", "2020-01-01T00:00:00+00:00")
    store.r.hset(f"drover:job:{job_id}", "updated", "2020-01-01T00:00:00+00:00")
    job = store.get(job_id)
    step = current_step(job)
    assert step is not None and not step.started
    assert _quiet_s(rt, job, step) > 3600  # idle for years: due to be sent again
    store.mark_redispatched(job_id, step.phase.value)
    assert _quiet_s(rt, job, step) < 5  # just sent again: not again before its back-off


# --- draining -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("control", "after", "kind"),
    [
        (ControlFlow.P2P, 0.0, "continue"),  # not draining
        (ControlFlow.P2P, 5.0, "continue"),  # within the drain timeout
        (ControlFlow.P2P, 11.0, "handover"),
        (ControlFlow.DIRECT, 11.0, "abort"),
        (ControlFlow.UNMANAGED, 11.0, "abort"),
    ],
)
def test_a_draining_worker_waits_then_hands_over_or_aborts(
    control: ControlFlow, after: float, kind: str
) -> None:
    spec = SPEC.model_copy(update={"control": control})
    action = drain_action(spec, after, 10.0)
    assert action.kind == kind
    if kind != "continue":
        assert "drain timeout (10s)" in action.reason


def test_hosts_show_a_draining_worker_and_a_refused_config() -> None:
    row = {
        "worker_alive": False,
        "draining": {"since": "2026-12-01T10:00:00", "running": ["ab12"]},
        "config_error": "config /etc/drover/drover.toml is not valid TOML",
    }
    cell = worker_cell(row)
    assert "draining since 2026-12-01T10:00:00 (running ab12)" in cell
    assert "DEAD" not in cell and "CONFIG NOT LOADED" in cell
    assert worker_cell({"worker_alive": False}) == "DEAD"
    assert worker_cell({"worker_alive": True}) == "alive"


# --- a claim whose worker died before the phase started ----------------------------------


def test_a_dead_workers_claim_on_an_unstarted_phase_is_given_back(
    store: JobStore, tmp_path: Path
) -> None:
    """Killed between the claim and the phase's start, a worker leaves a claim that would drop
    every message sent again: recovery gives it back (Redis and the host's ledger), and the
    phase can be claimed again. A live runner's claim, or another host's, is left alone."""
    from worker.ledger import Ledger
    from worker.recovery import give_back_dead_claim

    ledger = Ledger(str(tmp_path / "ledger"))
    rt = Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=ledger)
    job_id = store.create(SPEC, host="cli")
    perform = Phase.PERFORM.value
    assert store.claim_phase(job_id, perform, "kvm1") and ledger.claim(job_id, perform)
    assert not store.claim_phase(job_id, perform, "kvm1")  # a message sent again: dropped

    beside = runtime(store)  # a live worker running it keeps its claim
    assert beside.begin(job_id, perform) is None
    assert give_back_dead_claim(rt, job_id, Phase.PERFORM) is False
    beside.end(job_id, perform)  # its mark gone, as a dead worker's expires

    assert give_back_dead_claim(rt, job_id, Phase.PERFORM) is True
    assert store.claim_phase(job_id, perform, "kvm1") and ledger.claim(job_id, perform)

    store.unclaim_phase(job_id, perform)
    assert store.claim_phase(job_id, perform, "kvm2")  # another host's claim: not ours to give
    assert give_back_dead_claim(rt, job_id, Phase.PERFORM) is False
    assert store.claim_of(job_id, perform) == "kvm2"


# --- a job record rewritten to look interrupted ---------------------------------------------


def _before_perform(store: JobStore) -> str:
    """A job whose source_preflight and destination_prepare ended (perform is next)."""
    job_id = store.create(SPEC, host="cli")
    for done in (Phase.SOURCE_PREFLIGHT.value, Phase.DESTINATION_PREPARE.value):
        store.phase_ended(job_id, done, started=store.phase_started(job_id, done, "kvm1"))
    return job_id


def _attended(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Runtime, list[Phase], list[str]]:
    """A kvm1 runtime whose recovery records what it would recover and send again (the
    sweep's step for one job is `_step`)."""
    from worker.ledger import Ledger

    recovered: list[Phase] = []
    resent: list[str] = []

    def chain(app: object, job_id: str, spec: object, start: Phase) -> _NoSend:
        resent.append(start.value)
        return _NoSend()

    monkeypatch.setattr(recovery, "_recover", lambda rt, job, phase: recovered.append(phase))
    monkeypatch.setattr(recovery, "verified", lambda rt, job: True)
    monkeypatch.setattr(recovery, "migration_chain", chain)
    monkeypatch.setattr(threading, "Thread", InlineThread)
    rt = Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=Ledger(str(tmp_path)))
    return rt, recovered, resent


class _NoSend:
    def apply_async(self) -> None:
        return None


def _step(rt: Runtime, job_id: str) -> None:
    job = rt.store.get(job_id)
    step = current_step(job)
    assert step is not None
    recovery._attend(rt, job, step)


def test_a_phase_this_host_ended_is_never_settled_again_whatever_the_record_says(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job made to look mid-perform (its perform record reopened in Redis) would be
    re-attached: a paused guest resumed, a rollback sent. The host's ledger says perform ended
    here: nothing is done, and that is said once."""
    from worker.ledger import PhaseMark

    rt, recovered, _ = _attended(store, tmp_path, monkeypatch)
    job_id = _before_perform(store)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")  # started, never ended (record)
    _step(rt, job_id)
    assert recovered == [Phase.PERFORM]  # an interrupted perform is recovered

    recovered.clear()
    rt.ledger.mark(job_id, Phase.PERFORM.value, PhaseMark.ENDED)
    _step(rt, job_id)
    _step(rt, job_id)
    assert recovered == []
    assert rt.noted_contradictions == {(job_id, Phase.PERFORM.value)}


def test_a_phase_this_host_started_is_never_sent_again_nor_its_claim_given_back(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job whose later phase records were deleted (its state set back) looks like
    a step whose claimant died before it started: the claim would be given back and the phase
    sent again, migrating the guest a second time. The ledger says it started here."""
    from worker.ledger import PhaseMark
    from worker.recovery import give_back_dead_claim

    rt, _, resent = _attended(store, tmp_path, monkeypatch)
    monkeypatch.setattr(recovery, "_quiet_s", lambda rt, job, step: 1e9)  # long overdue
    perform = Phase.PERFORM.value
    job_id = _before_perform(store)
    store.r.hset(f"drover:job:{job_id}", "admitted", "2020-01-01T00:00:00+00:00")
    for gate, _ in gate_names(store.get(job_id).spec):  # admitted as the admit script does
        store.r.sadd(gate, job_id)
    assert store.claim_phase(job_id, perform, "kvm1") and rt.ledger.claim(job_id, perform)
    rt.ledger.mark(job_id, perform, PhaseMark.STARTED)

    _step(rt, job_id)
    assert resent == []
    assert give_back_dead_claim(rt, job_id, Phase.PERFORM) is False
    assert store.claim_of(job_id, perform) == "kvm1"
    assert not rt.ledger.claim(job_id, perform)  # still claimed here
    assert rt.noted_contradictions == {(job_id, perform)}

    rt.ledger.unclaim(job_id, perform)  # a claimant that died before it started: no mark
    assert rt.ledger.claim(job_id, perform)
    _step(rt, job_id)
    assert resent == [perform]
