"""A phase that cannot ask libvirt never says where the guest is: libvirt has the last word.

Seen on the lab: a source libvirtd restarted at the switch-over, and a destination libvirtd
down for longer than finish's retries (or its ledger locked) during finish, each failed a
job whose guest ran on the destination; a worker killed while a phase waited for its retry
left the job `finishing` for ever (the phase read as ended). From perform on, such a phase
now stops without a verdict and stays started for recovery; a retry gives the phase back as
never started; recovery waits, quietly, for its libvirtd to answer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.phases import PHASE_ORDER, Phase
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState
from jobs.store import JobStore
from worker import job_end, phase_failure, recovery
from worker.ledger import Ledger, PhaseMark
from worker.libvirt_host import LibvirtHost, LibvirtUnavailable
from worker.phase_errors import Interrupted, PhaseFailed, RetryPhase
from worker.phase_frame import run_in_frame
from worker.recovery import Step, current_step
from worker.runtime import Runtime

TEST_URI = "test:///default"
# The phases before each, as the job record shows them once that phase may start.
BEFORE = {
    Phase.SOURCE_PREFLIGHT: (),
    Phase.PERFORM: (JobState.PREFLIGHT, JobState.PREPARED),
    Phase.FINISH: (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING),
    Phase.CONFIRM: (
        JobState.PREFLIGHT,
        JobState.PREPARED,
        JobState.MIGRATING,
        JobState.FINISHING,
    ),
}
RETRIES = 3  # config/tunables.py phase_retries for every retryable phase


@pytest.fixture
def env(config: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return config


@pytest.fixture
def rollbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Rollbacks asked of the destination (none may be, when nothing is known)."""
    asked: list[str] = []
    for module in (job_end, phase_failure):
        monkeypatch.setattr(module, "rollback_destination_later", lambda job: asked.append(job.id))
    return asked


@pytest.fixture
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as seen:
        yield seen


def runtime(store: JobStore, tmp_path: Path, host: str, *, libvirtd_up: bool = True) -> Runtime:
    def opener(uri: str) -> libvirt.virConnect:
        if not libvirtd_up:
            raise libvirt.libvirtError("Failed to connect socket: No such file or directory")
        return libvirt.open(TEST_URI)

    return Runtime(host, store, LibvirtHost(TEST_URI, opener=opener), Ledger(str(tmp_path / host)))


def job_at(store: JobStore, phase: Phase) -> str:
    """A job whose phases before `phase` ran, and whose `phase` is claimed by its host."""
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="test")
    for state in BEFORE[phase]:
        moved, _ = store.transition(job_id, state, host="test")
        assert moved, state
    for earlier in PHASE_ORDER[: PHASE_ORDER.index(phase)]:
        store.phase_ended(
            job_id, earlier.value, started=store.phase_started(job_id, earlier.value, "test")
        )
    return job_id


def stopped_by(rt: Runtime, job_id: str, phase: Phase, exc: Exception, attempt: int) -> None:
    def fn(_rt: Runtime, _job: object) -> JobState | None:
        raise exc

    assert rt.store.claim_phase(job_id, phase.value, rt.host) and rt.ledger.claim(
        job_id, phase.value
    )
    run_in_frame(rt, rt.store.get(job_id), phase, fn, False, attempt)


LIBVIRTD_DOWN = LibvirtUnavailable("cannot connect to libvirt at test:///default: refused")


@pytest.mark.parametrize(
    ("phase", "host", "exc", "attempt"),
    [
        (Phase.PERFORM, "kvm1", LIBVIRTD_DOWN, 0),  # perform is never retried
        (Phase.FINISH, "kvm2", LIBVIRTD_DOWN, RETRIES),  # out of tries
        (Phase.CONFIRM, "kvm1", LIBVIRTD_DOWN, RETRIES),
        (Phase.FINISH, "kvm2", sqlite3.OperationalError("database is locked"), 0),
    ],
    ids=["perform-libvirtd", "finish-libvirtd", "confirm-libvirtd", "finish-ledger-locked"],
)
def test_from_perform_on_a_phase_that_cannot_ask_libvirt_gives_no_verdict(
    env: Path,
    store: JobStore,
    tmp_path: Path,
    rollbacks: list[str],
    phase: Phase,
    host: str,
    exc: Exception,
    attempt: int,
) -> None:
    rt = runtime(store, tmp_path, host)
    job_id = job_at(store, phase)
    with pytest.raises(Interrupted):
        stopped_by(rt, job_id, phase, exc, attempt)
    job = store.get(job_id)
    assert job.state not in TERMINAL, job.reason
    assert rollbacks == []
    record = job.phases[phase.value]
    assert record.ended is None  # still started: recovery settles it from libvirt
    assert current_step(job) == Step(phase, True, record.started)
    assert rt.ledger.marked(job_id, phase.value, PhaseMark.STARTED)
    assert not rt.ledger.marked(job_id, phase.value, PhaseMark.ENDED)
    assert store.claim_of(job_id, phase.value) == host
    assert job.waiting_for is not None and "libvirt's to say" in job.waiting_for


def test_before_the_migration_a_phase_out_of_tries_still_fails_the_job(
    env: Path, store: JobStore, tmp_path: Path, rollbacks: list[str]
) -> None:
    """The guest has not left its source before perform: failing the job says the truth."""
    rt = runtime(store, tmp_path, "kvm1")
    job_id = job_at(store, Phase.SOURCE_PREFLIGHT)
    with pytest.raises(PhaseFailed):
        stopped_by(rt, job_id, Phase.SOURCE_PREFLIGHT, LIBVIRTD_DOWN, RETRIES)
    assert store.get(job_id).state is JobState.FAILED


def test_a_phase_to_be_retried_reads_as_never_started(
    env: Path, store: JobStore, tmp_path: Path, rollbacks: list[str]
) -> None:
    """Its record used to end "retrying: ...": with its worker killed before the retry came,
    recovery took the phase for done, and the job stayed `finishing` for ever. Given back,
    it is sent again once it has been quiet for `redispatch_after`."""
    rt = runtime(store, tmp_path, "kvm1")
    job_id = job_at(store, Phase.CONFIRM)
    with pytest.raises(RetryPhase):
        stopped_by(rt, job_id, Phase.CONFIRM, LIBVIRTD_DOWN, 0)
    job = store.get(job_id)
    assert Phase.CONFIRM.value not in job.phases
    step = current_step(job)
    assert step is not None and step.phase is Phase.CONFIRM and not step.started
    assert store.claim_of(job_id, Phase.CONFIRM.value) is None
    assert rt.ledger.claim(job_id, Phase.CONFIRM.value)  # this host may run it again
    assert job.state is JobState.FINISHING and rollbacks == []


def test_recovery_waits_for_its_libvirtd_and_says_so_once(
    env: Path,
    store: JobStore,
    tmp_path: Path,
    rollbacks: list[str],
    events: list[MutableMapping[str, Any]],
) -> None:
    rt = runtime(store, tmp_path, "kvm2", libvirtd_up=False)
    job_id = job_at(store, Phase.FINISH)
    store.phase_started(job_id, Phase.FINISH.value, "kvm2")
    for _ in range(3):  # three sweeps' recoveries while libvirtd is down
        recovery._recover(rt, store.get(job_id), Phase.FINISH)
    said = [e for e in events if e["event"] == "phase.not_recovered"]
    assert len(said) == 1 and "libvirtd does not answer" in str(said[0]["reason"])
    assert not any(e["event"] == "phase.recovering" for e in events)
    assert store.runner(job_id, Phase.FINISH.value) is None  # nothing taken meanwhile
    assert store.get(job_id).state is JobState.MIGRATING
