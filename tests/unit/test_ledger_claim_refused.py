"""A phase whose claim this host's ledger refuses (the SQLite file locked by another
process, or its disk full) before anything ran: the claim in Redis is given back, the job says
why it waits, and the message is tried again while the phase has tries left, else dropped for
recovery. (Before: an uncaught `database is locked` traceback in the worker's log, and the
job silent in its state until recovery sent the phase again.) Real test Redis, real SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from jobs.keys import claims_key
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit.test_forged_admission import admit, rt, submit
from worker.ledger import LEDGER_FILE
from worker.phase_errors import Dropped, PhaseFailed, RetryPhase
from worker.phase_frame import execute_phase
from worker.runtime import Runtime

__all__ = ["rt"]  # a fixture, used by name


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[None]:
    """The ledger's file held in an exclusive transaction by another connection."""
    other = sqlite3.connect(tmp_path / "ledger" / LEDGER_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    yield
    other.execute("ROLLBACK")
    other.close()


def body(_rt: Runtime, _job: Job) -> JobState | None:
    raise AssertionError("nothing runs while the ledger refuses the claim")


@pytest.mark.parametrize(("tries", "raised"), [(0, Dropped), (2, RetryPhase)])
def test_a_refused_claim_gives_the_phase_back_and_says_why(
    rt: Runtime, store: JobStore, locked: None, tries: int, raised: type[Exception]
) -> None:
    rt.settings.tunables.phase_retries[Phase.SOURCE_PREFLIGHT.value] = tries
    job_id = submit(store, "web01")
    assert admit(rt) == [job_id]
    with capture_logs() as logs, pytest.raises(raised):
        execute_phase(rt, job_id, Phase.SOURCE_PREFLIGHT, body)
    job = store.get(job_id)
    assert job.waiting_for is not None
    assert job.waiting_for.startswith("source_preflight waits for kvm1's ledger: database is")
    assert Phase.SOURCE_PREFLIGHT.value not in job.phases  # given back: never started
    assert not store.r.hexists(claims_key(job_id), Phase.SOURCE_PREFLIGHT.value)
    said = [e["event"] for e in logs]
    assert said[-1] == ("phase.retrying" if tries else "phase.deferred"), said


def test_a_ledger_locked_at_the_phase_end_leaves_the_job_in_the_state_the_phase_entered(
    rt: Runtime, store: JobStore, tmp_path: Path
) -> None:
    """The phase ran; at its end this host's ledger is locked by another process past its
    wait. Its end and the state it returns are in Redis together, so the job is not left with
    the phase ended and its state never entered (before: the ledger's error escaped between
    the two writes; for confirm, the last phase, the job stayed `finishing` for ever)."""
    job_id = submit(store, "web01")
    assert admit(rt) == [job_id]
    other = sqlite3.connect(tmp_path / "ledger" / LEDGER_FILE, isolation_level=None)

    def ran_then_locked(_rt: Runtime, _job: Job) -> JobState | None:
        other.execute("BEGIN EXCLUSIVE")  # as another process holding the file
        return JobState.PREFLIGHT

    try:
        with capture_logs() as logs:
            execute_phase(rt, job_id, Phase.SOURCE_PREFLIGHT, ran_then_locked)
    finally:
        other.execute("ROLLBACK")
        other.close()
    job = store.get(job_id)
    assert job.state is JobState.PREFLIGHT
    assert job.phases[Phase.SOURCE_PREFLIGHT.value].ended is not None
    said = [e["event"] for e in logs]
    assert said[-3:] == ["phase.end_unmarked", "phase.finished", "job.state"], said


def test_a_ledger_locked_as_a_phase_fails_leaves_the_job_failed(
    rt: Runtime, store: JobStore, tmp_path: Path
) -> None:
    """The phase refused (a memory refusal, NeverLeft); at its end this host's ledger is
    locked. The job still ends `failed` with the phase's reason (before: the ledger's error
    escaped between the phase's end and the failure; every phase ended, the job live for
    ever and its guest's next migration refused as busy: the fault probe)."""
    job_id = submit(store, "web01")
    assert admit(rt) == [job_id]
    other = sqlite3.connect(tmp_path / "ledger" / LEDGER_FILE, isolation_level=None)

    def refused_then_locked(_rt: Runtime, _job: Job) -> JobState | None:
        other.execute("BEGIN EXCLUSIVE")
        raise PhaseFailed("kvm1 has 36 MiB free, web01 needs 64 MiB")

    try:
        with capture_logs() as logs, pytest.raises(PhaseFailed):
            execute_phase(rt, job_id, Phase.SOURCE_PREFLIGHT, refused_then_locked)
    finally:
        other.execute("ROLLBACK")
        other.close()
    job = store.get(job_id)
    assert job.state is JobState.FAILED
    assert job.reason == "kvm1 has 36 MiB free, web01 needs 64 MiB"
    assert "phase.end_unmarked" in [e["event"] for e in logs]
