"""A record written `cancelled` (or `failed`, `rolled_back`) by hand while the source's perform
migrates its guest: libvirt goes on and the guest lands. The destination's finish, seeing the
record ended, used to stop: the job said the guest never moved, and nothing checked where it
ran (attacker probe, left alone last stop). Now finish takes the job back up when this host's
own records and libvirtd contradict its end, and only then. Real test Redis and ledger, and
libvirt's test driver as the destination's libvirtd (its guest runs: it "arrived").
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.keys import ACTIVE_JOBS, job_key
from jobs.model import Job
from jobs.phases import Phase
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit import test_libvirt_seam as seam
from tests.unit.test_forged_admission import admit, rt, submit
from worker import contradicted_end
from worker.ledger import Ledger
from worker.phase_errors import Dropped
from worker.phase_frame import execute_phase
from worker.runtime import Runtime

__all__ = ["rt"]  # a fixture, used by name
hv = seam.hv
NOWHERE = "00000000-0000-0000-0000-0000000000ff"  # no domain of the test driver


@pytest.fixture
def kvm2(
    rt: Runtime,
    store: JobStore,
    tmp_path: Path,
    hv: libvirt.virConnect,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    """The destination's worker: the test driver is its libvirtd, which has no job calls
    (virDomainGetJobInfo): no migration runs on its guest, as after a migration's end."""
    monkeypatch.setattr(contradicted_end, "incoming_job", lambda _dom: False)
    return Runtime("kvm2", store, seam.seam(), Ledger(str(tmp_path / "ledger-kvm2")))


def migrating(rt: Runtime, kvm2: Runtime, store: JobStore, uuid: str) -> str:
    """A job of the test guest kvm1 -> kvm2 in its perform: kvm2 prepared it and recorded
    the guest as coming in (as destination_prepare does)."""
    job_id = submit(store, seam.GUEST)
    assert admit(rt) == [job_id]
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert store.transition(job_id, state, host="test")[0]
    assert kvm2.ledger.claim(job_id, Phase.DESTINATION_PREPARE.value)
    assert kvm2.ledger.take_incoming(uuid, job_id, lambda _: False) is None
    return job_id


class Finish:
    """finish's body, as far as the frame is concerned: it ran, for which state."""

    def __init__(self) -> None:
        self.saw: list[JobState] = []

    def __call__(self, _rt: Runtime, job: Job) -> JobState | None:
        self.saw.append(job.state)
        return None


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.mark.parametrize(
    "forged",
    # succeeded and checked too (attacker probe): drover enters succeeded only after this
    # host's finish, and checked only for a dry run, which prepares nothing
    [
        JobState.CANCELLED,
        JobState.FAILED,
        JobState.ROLLED_BACK,
        JobState.SUCCEEDED,
        JobState.CHECKED,
    ],
)
def test_an_end_written_by_hand_under_an_arrived_guest_is_taken_back_up(
    rt: Runtime, kvm2: Runtime, store: JobStore, hv: libvirt.virConnect, forged: JobState
) -> None:
    job_id = migrating(rt, kvm2, store, hv.lookupByName(seam.GUEST).UUIDString())
    store.r.hset(job_key(job_id), "state", forged.value)  # the attacker, mid-perform
    finish = Finish()
    with capture_logs() as logs:
        execute_phase(kvm2, job_id, Phase.FINISH, finish)
    assert finish.saw == [JobState.FINISHING]
    job = store.get(job_id)
    assert job.state is JobState.FINISHING and not job.terminal
    expected = f"the record said {forged.value}, but {seam.GUEST} runs on kvm2"
    assert job.reason is not None and job.reason.startswith(expected)
    assert job.transitions[-1].state is JobState.FINISHING
    assert job.transitions[-1].host == "kvm2"
    (reopened,) = said(logs, "job.reopened")
    assert reopened["previous"] == forged.value
    assert store.r.sismember(ACTIVE_JOBS, job_id)  # live again: recovery watches it


def unrecorded(kvm2: Runtime, job_id: str, _mp: pytest.MonkeyPatch) -> None:
    kvm2.ledger.drop_incoming(kvm2.ledger.incoming_uuid(job_id) or "", job_id)


def finished_here(kvm2: Runtime, job_id: str, _mp: pytest.MonkeyPatch) -> None:
    kvm2.ledger.claim(job_id, Phase.FINISH.value)


def not_arrived(kvm2: Runtime, job_id: str, mp: pytest.MonkeyPatch) -> None:
    unrecorded(kvm2, job_id, mp)
    assert kvm2.ledger.take_incoming(NOWHERE, job_id, lambda _: False) is None


def still_coming(_kvm2: Runtime, _job_id: str, mp: pytest.MonkeyPatch) -> None:
    """libvirt here runs an incoming migration on the guest: it has not arrived yet."""
    mp.setattr(contradicted_end, "incoming_job", lambda _dom: True)


@pytest.mark.parametrize(
    ("forged", "local"),
    [
        (JobState.CANCELLED, unrecorded),  # this host never recorded a guest coming in
        (JobState.CANCELLED, finished_here),  # its own finish ran here (and ended it so)
        (JobState.FAILED, not_arrived),  # libvirt here runs no such guest: it never came
        (JobState.CANCELLED, still_coming),  # libvirt here still takes it in
        (JobState.SUCCEEDED, finished_here),  # drover's own success: finish ran here
    ],
    ids=["no-incoming-guest", "finished-here", "guest-not-here", "still-coming", "succeeded"],
)
def test_an_end_that_libvirt_does_not_contradict_stands(
    rt: Runtime,
    kvm2: Runtime,
    store: JobStore,
    hv: libvirt.virConnect,
    forged: JobState,
    local: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = migrating(rt, kvm2, store, hv.lookupByName(seam.GUEST).UUIDString())
    if local is not None:
        local(kvm2, job_id, monkeypatch)
    store.r.hset(job_key(job_id), "state", forged.value)
    finish = Finish()
    with capture_logs() as logs, pytest.raises(Dropped):
        execute_phase(kvm2, job_id, Phase.FINISH, finish)
    assert finish.saw == [] and not said(logs, "job.reopened")
    assert store.get(job_id).state is forged


def test_only_finish_takes_a_job_back_up(
    rt: Runtime, kvm2: Runtime, store: JobStore, hv: libvirt.virConnect
) -> None:
    """A confirm (or any other phase's) message for the ended job is dropped as before: the
    destination's finish is the one step whose host sees the guest arrive."""
    job_id = migrating(rt, kvm2, store, hv.lookupByName(seam.GUEST).UUIDString())
    store.r.hset(job_key(job_id), "state", JobState.CANCELLED.value)
    finish = Finish()
    with pytest.raises(Dropped):
        execute_phase(rt, job_id, Phase.CONFIRM, finish)
    assert finish.saw == [] and store.get(job_id).state is JobState.CANCELLED
