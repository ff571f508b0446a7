"""Post-copy recovery's parts that need no hypervisor: libvirt's states and reasons read as
drover judges them, the resume call, the job states that keep the holds, and abort's refusal.
(The recovery itself is checked on the lab: tests/faults/test_postcopy_recovery.py.)"""

from __future__ import annotations

import libvirt
import pytest

from jobs.abort import TooLate, abort_job
from jobs.keys import ACTIVE_JOBS
from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState, allowed_sources
from jobs.store import JobStore
from jobs.submission import enqueue
from worker.libvirt_states import StateReason
from worker.migration_call import MigrationCall, flag_names, resume_call
from worker.postcopy_whereabouts import Whereabouts

PAUSED_FAILED = StateReason(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
PAUSED_POSTCOPY = StateReason(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
HUNG = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED)
ARRIVED = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
LEFT = StateReason(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
PLAIN_PAUSE = StateReason(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)


def where(
    source: StateReason | None, destination: StateReason | None, reachable: bool = True
) -> Whereabouts:
    return Whereabouts("web01", "kvm1", "kvm2", source, destination, reachable)


def test_libvirt_s_post_copy_reasons_are_told_apart() -> None:
    assert PAUSED_FAILED.postcopy_failed and PAUSED_FAILED.in_postcopy
    assert PAUSED_POSTCOPY.in_postcopy and not PAUSED_POSTCOPY.postcopy_failed
    assert HUNG.postcopy_failed and not HUNG.running  # "running", but QEMU postcopy-paused
    assert ARRIVED.running and not ARRIVED.in_postcopy
    assert not PLAIN_PAUSE.in_postcopy and not LEFT.active
    assert PAUSED_FAILED.describe() == "paused (post-copy failed)"
    assert HUNG.describe() == "running (post-copy failed)"


def test_a_broken_post_copy_is_resumable_only_when_the_destination_answers() -> None:
    broken = where(PAUSED_FAILED, HUNG)
    assert broken.failed and broken.resumable and not broken.landed
    cut = where(PAUSED_FAILED, None, reachable=False)
    assert cut.failed and not cut.resumable and not cut.landed
    assert "unknown (its libvirtd does not answer) on kvm2" in cut.describe()
    # The destination gave up first: the source's libvirtd has not noticed yet.
    assert not where(PAUSED_POSTCOPY, HUNG).resumable
    # A source still in post-copy behind a cut link: a post-copy all the same, never rolled back.
    assert where(PAUSED_POSTCOPY, None, reachable=False).in_postcopy
    assert not where(PLAIN_PAUSE, None).in_postcopy


def test_landed_means_running_on_the_destination_only() -> None:
    assert where(LEFT, ARRIVED).landed and where(None, ARRIVED).landed
    assert not where(LEFT, ARRIVED, reachable=False).landed
    assert not where(PAUSED_FAILED, ARRIVED).landed
    assert not where(LEFT, HUNG).landed
    assert where(PAUSED_FAILED, HUNG).describe() == (
        "web01 is paused (post-copy failed) on kvm1, running (post-copy failed) on kvm2"
    )


def test_a_post_copy_with_a_half_gone_is_beyond_resume() -> None:
    """Both halves are needed: the destination's copy (the newest memory) and the source's
    (the pages not yet copied, and where a resume is made)."""
    gone = where(PAUSED_FAILED, None).beyond_resume()
    assert gone == (
        "kvm2's copy is gone (kvm2's libvirtd has no web01): the guest's newest memory went with it"
    )
    booted = StateReason(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
    assert where(booted, None).beyond_resume() == gone  # restarted by hand on the source
    # Its QEMU killed, a persistent definition left shut off (fault probe: the job retried a
    # resume that could never work, for an hour).
    shut_off = StateReason(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert where(PAUSED_FAILED, shut_off).beyond_resume() == (
        "kvm2's copy is gone (kvm2's libvirtd shows a shut-off web01): the guest's newest "
        "memory went with it"
    )
    source_gone = "kvm1's copy no longer takes part in the post-copy"
    assert str(where(None, HUNG).beyond_resume()).startswith(source_gone)
    assert str(where(LEFT, HUNG).beyond_resume()).startswith(source_gone)
    # Still resumable, landed, or not known: never called lost.
    assert where(PAUSED_FAILED, HUNG).beyond_resume() is None
    assert where(PAUSED_POSTCOPY, HUNG).beyond_resume() is None
    assert where(LEFT, ARRIVED).beyond_resume() is None
    assert where(PAUSED_FAILED, None, reachable=False).beyond_resume() is None


def test_the_resume_call_is_the_same_call_with_postcopy_resume() -> None:
    params = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}
    call = MigrationCall("migrateToURI3", "qemu+tcp://kvm2/system", None, params, 1)
    again = resume_call(call)
    assert (again.api, again.dconnuri, again.params) == (call.api, call.dconnuri, params)
    names = flag_names(again.flags)
    assert {"VIR_MIGRATE_LIVE", "VIR_MIGRATE_POSTCOPY", "VIR_MIGRATE_POSTCOPY_RESUME"} <= set(names)


def test_post_copy_states_come_from_migrating_and_lead_back_to_it() -> None:
    assert allowed_sources(JobState.POSTCOPY_RECOVERING) >= {JobState.MIGRATING}
    assert JobState.PREPARED not in allowed_sources(JobState.POSTCOPY_RECOVERING)
    assert JobState.POSTCOPY_RECOVERING in allowed_sources(JobState.MIGRATING)
    assert JobState.POSTCOPY_RECOVERING not in allowed_sources(JobState.FINISHING)


def in_postcopy(store: JobStore) -> str:
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2", live=True, postcopy=True)
    job_id = enqueue(store, spec, origin="test")
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert store.transition(job_id, state, host="kvm1")[0]
    store.mark_postcopy(job_id)
    assert store.reserve("kvm2", job_id, 512)
    return job_id


def no_rollback(_job: Job) -> None:
    raise AssertionError("a post-copy is never rolled back")


def test_a_recovering_job_keeps_its_holds_and_refuses_abort(store: JobStore) -> None:
    job_id = in_postcopy(store)
    why = "post-copy failed; web01 is paused (post-copy failed) on kvm1: resuming"
    assert store.transition(job_id, JobState.POSTCOPY_RECOVERING, host="kvm1", reason=why)[0]
    with pytest.raises(TooLate, match="postcopy_recovering: its post-copy failed"):
        abort_job(store, job_id, by="test", rollback=no_rollback)
    job = store.get(job_id)
    assert job.abort_requested is None and job.reason == why
    assert store.reserved_mib("kvm2") == 512 and store.r.sismember(ACTIVE_JOBS, job_id)
    assert store.transition(job_id, JobState.POSTCOPY_PAUSED, host="kvm1", reason="gave up")[0]
    with pytest.raises(TooLate, match="postcopy_paused"):
        abort_job(store, job_id, by="test", rollback=no_rollback)
    assert store.reserved_mib("kvm2") == 512
    for state in (JobState.MIGRATING, JobState.FINISHING, JobState.SUCCEEDED):
        assert store.transition(job_id, state, host="kvm1")[0], state
    assert store.reserved_mib("kvm2") == 0
