"""Post-copy done right: a post-copy migration that breaks is resumed, never failed.

dirty-1 goes lab1 -> lab2 under the `manual` policy with --postcopy, is switched to post-copy
by the operator (`Drover.start_postcopy`) and held there by a 1 MiB/s post-copy cap; then the
link to lab2 is cut past libvirt's keepalive, or the migration stream is reset (`ss -K`),
or the source's worker is killed and the stream reset before it comes back. In every case
libvirt shows the guest paused on lab1 ("post-copy failed") and hung on lab2, drover resumes
the migration (VIR_MIGRATE_POSTCOPY_RESUME) and the job succeeds with the recovery in its
events; the guest ends running on lab2 only, per libvirt on both hosts. Past a (shortened)
recovery deadline the job says where the guest is, keeps its holds, and goes on once libvirt
shows the guest landed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from jobs.keys import ACTIVE_JOBS
from jobs.model import Job
from jobs.states import JobState
from lab import control, faults
from producer.api import SubmitError
from tests.faults.conftest import FAULT_WINDOW_S, assert_invariants, finish, in_transfer
from tests.support.lab_fixtures import Lab, wait_for
from tests.support.postcopy import lift_postcopy_cap

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]

DOMAIN = "dirty-1"
# Pre-copy slow enough that the switch lands mid-transfer; post-copy held open at 1 MiB/s.
POSTCOPY_JOB: dict[str, Any] = {
    "policy": "manual",
    "postcopy": True,
    "bandwidth_mib": 8,
    "postcopy_bandwidth_mib": 1,
}
KEPT_LOGS = Path("/tmp/drover-postcopy-logs")
SWITCH_TRIES, SWITCH_WAIT_S = 3, 15.0
# Past libvirt's 30 s keepalive: the peers give each other up and the post-copy fails.
LONG_CUT_S = 45.0
KEEPALIVE_FAILURE_S = 90.0
FAILURE_SEEN_S = 30.0
RECOVERY_S = 120.0
# Once resumed, the rest of the memory goes at this speed (MiB/s) so the case ends soon.
CATCH_UP_MIB = 256
# A deadline the recovery cannot meet while the link is down.
SHORT_DEADLINE_S = 3
RECOVERY_EVENTS = ("postcopy.failed", "postcopy.resuming", "postcopy.resumed")


@pytest.fixture(autouse=True)
def kept_logs(lab: Lab, request: pytest.FixtureRequest) -> Iterator[None]:
    """Each case's worker and libvirtd logs, copied out of the lab (which `down` removes) to
    KEPT_LOGS/<case> for a look after a failure."""
    yield
    hosts = Path(lab.config).parent / "hosts"
    target = KEPT_LOGS / request.node.name
    for name in ("lab1", "lab2"):
        for part in ("worker.log", "log"):
            source = hosts / name / part
            if source.is_dir():
                shutil.copytree(source, target / name / part, dirs_exist_ok=True)
            elif source.exists():
                (target / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target / name / part)


def source_state(lab: Lab, host: str = "lab1") -> tuple[int, int] | None:
    """dirty-1's (state, reason) on `host` (lab1) per libvirt; None once it is not defined
    there."""
    conn = libvirt.open(lab.uri(host))
    try:
        state, reason = conn.lookupByName(DOMAIN).state()
        return int(state), int(reason)
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def source_is(lab: Lab, reason: int) -> Callable[[], bool]:
    return lambda: source_state(lab) == (libvirt.VIR_DOMAIN_PAUSED, reason)


def switched_over(lab: Lab) -> bool:
    """libvirt shows the post-copy on both hosts: paused on lab1, and running on lab2.

    The second half matters: until the destination's libvirtd has run its Finish step (which
    resumes the guest there, "running (post-copy)"), the incoming copy is still bound to the
    source libvirtd's connection, and libvirt destroys it when that connection drops (the
    keepalive of a cut link). A fault injected in that window loses the guest by libvirt's
    own rule (the job then fails with postcopy.lost), which is not the recovery under test.
    """
    return source_is(lab, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)() and source_state(lab, "lab2") == (
        libvirt.VIR_DOMAIN_RUNNING,
        libvirt.VIR_DOMAIN_RUNNING_POSTCOPY,
    )


def start_in_postcopy(lab: Lab) -> str:
    """Submit, switch to post-copy once memory is on the wire; return once libvirt shows it.

    The switch is asked again (as an operator would) if libvirt has not made it within
    SWITCH_WAIT_S: once in a few runs the first request leaves the migration in pre-copy.
    """
    job_id = lab.drover.submit(domain=DOMAIN, src="lab1", dst="lab2", live=True, **POSTCOPY_JOB)
    wait_for(in_transfer(lab, job_id), FAULT_WINDOW_S, "the migration to be in flight")
    for _ in range(SWITCH_TRIES):
        try:  # answered once the worker made the switch; a second ask finds it made
            print(lab.drover.start_postcopy(job_id))
        except SubmitError as exc:
            print(f"the switch asked again: {exc}")
        try:
            wait_for(lambda: switched_over(lab), SWITCH_WAIT_S, "post-copy on both hosts")
            return job_id
        except AssertionError:
            said = [(e["event"], e.get("reason") or e.get("error")) for e in timeline(lab, job_id)]
            log = Path(lab.config).parent / "hosts" / "lab1" / "worker.log"
            tail = [line for line in log.read_text().splitlines() if "postcopy" in line][-5:]
            print(
                f"no post-copy yet; lab1 shows {source_state(lab)}, lab2 "
                f"{source_state(lab, 'lab2')}; {said}; lab1: {tail}"
            )
    raise AssertionError(f"no post-copy after {SWITCH_TRIES} requests; lab1 {source_state(lab)}")


def speed_up_postcopy(lab: Lab) -> bool:
    """Lift the 1 MiB/s post-copy cap of the (resumed) post-copy; True once libvirt or QEMU
    took it, or once there is no post-copy left on lab1 to speed up."""
    return lift_postcopy_cap(lab.uri("lab1"), DOMAIN, CATCH_UP_MIB)


def carried_to_the_end(lab: Lab, job_id: str) -> Callable[[], bool]:
    """Lift the cap on every look until the job has ended: a resume call made after one
    lift sets the job's 1 MiB/s post-copy cap again."""

    def check() -> bool:
        speed_up_postcopy(lab)
        return lab.drover.job(job_id).terminal

    return check


def timeline(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    """The job's events but its progress reports."""
    return [e for e in lab.drover.events(job_id) if e["event"] != "migration.progress"]


def events_of(lab: Lab, job_id: str) -> list[str]:
    return [e["event"] for e in lab.drover.events(job_id)]


def resumed_and_landed(lab: Lab, job_id: str) -> None:
    """drover resumes it; the test lifts the cap; the job succeeds with the recovery in its
    events, and libvirt shows the guest running on lab2 only."""
    wait_for(
        lambda: "postcopy.resuming" in events_of(lab, job_id), RECOVERY_S, "drover to resume it"
    )
    try:
        wait_for(carried_to_the_end(lab, job_id), RECOVERY_S, "the resumed post-copy to end")
    except AssertionError:
        said = [(e["event"], e.get("reason") or e.get("error")) for e in timeline(lab, job_id)]
        raise AssertionError(f"not landed: lab1 shows {source_state(lab)}; {said}") from None
    job = finish(lab, job_id)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert_invariants(lab, job, DOMAIN)
    assert lab.running_on(DOMAIN) == ["lab2"]
    assert lab.view("lab2", DOMAIN).state == libvirt.VIR_DOMAIN_RUNNING
    assert not lab.view("lab1", DOMAIN).active
    seen = events_of(lab, job_id)
    for event in lab.drover.events(job_id):  # the recovery's timeline, shown with -rP
        if event["event"].startswith("postcopy.") or event["event"] == "job.state":
            told = event.get("state") or event.get("reason") or event.get("error")
            print(event.get("ts"), event["event"], told)
    for name in RECOVERY_EVENTS:
        assert name in seen, f"no {name} in {seen}"
    states = [t.state for t in job.transitions]
    assert JobState.POSTCOPY_RECOVERING in states, states
    assert "failed" not in [t.state.value for t in job.transitions]


def interrupted_each_refusal(lab: Lab, job_id: str) -> None:
    """Under `postcopy_stall_timeout = 0`, every resume libvirt refused because the old
    stream still ran is followed by drover interrupting that stream before its next try."""
    steps = [
        (e["event"], str(e.get("error") or ""))
        for e in timeline(lab, job_id)
        if e["event"] in ("postcopy.resume_failed", "postcopy.interrupted", "postcopy.resuming")
    ]
    for at, (event, error) in enumerate(steps):
        if event == "postcopy.resume_failed" and "not valid" in error:
            after = [name for name, _ in steps[at + 1 :] if name != "postcopy.resume_failed"]
            assert after[:1] == ["postcopy.interrupted"], steps


def test_a_link_cut_past_the_keepalive_is_recovered(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    # A resume refused because the old stream outlived the cut interrupts that stream at once.
    fault_config("[tunables]\npostcopy_stall_timeout = 0\n")
    job_id = start_in_postcopy(lab)
    cut_at = time.monotonic()
    control.set_link("lab2", False)
    try:
        wait_for(
            source_is(lab, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
            KEEPALIVE_FAILURE_S,
            "libvirt to give the post-copy up",
        )
        wait_for(
            lambda: lab.drover.job(job_id).state is JobState.POSTCOPY_RECOVERING,
            FAILURE_SEEN_S,
            "the job to say its post-copy is being recovered",
        )
        job = lab.drover.job(job_id)
        assert job.reason is not None and "post-copy failed" in job.reason, job.reason
        listed = {j.id: j.state.value for j in lab.drover.jobs()}
        assert listed[job_id] == "postcopy_recovering"
        with pytest.raises(SubmitError, match="post-copy"):
            lab.drover.abort(job_id)
        assert lab.drover.store.abort_requested(job_id) is None
        wait_for(lambda: time.monotonic() - cut_at >= LONG_CUT_S, LONG_CUT_S, "the cut to last")
    finally:
        control.set_link("lab2", True)
    resumed_and_landed(lab, job_id)
    interrupted_each_refusal(lab, job_id)


def test_a_reset_migration_stream_is_recovered(lab: Lab) -> None:
    job_id = start_in_postcopy(lab)
    libvirtd_log = lab.log_dir("lab1") / "libvirtd.log"
    logged = libvirtd_log.stat().st_size
    assert faults.reset_migration_stream("lab1", "lab2") >= 1
    # libvirt's own word that the post-copy failed: its state, or its log. The state alone
    # can be missed: the worker's recovery resumes within tens of milliseconds, and a resume
    # that takes at once leaves the source "paused (post-copy)" (make test saw the failure
    # at .036 and the resume begin at .068, with the test polling every 0.1 s).
    wait_for(
        lambda: (
            source_is(lab, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)()
            or failed_in_postcopy_logged(libvirtd_log, logged)
        ),
        FAILURE_SEEN_S,
        "libvirt to see the post-copy fail",
    )
    resumed_and_landed(lab, job_id)


def failed_in_postcopy_logged(log: Path, since: int) -> bool:
    """libvirtd logged, after byte `since` of its log, that the migration failed in
    post-copy and it left the guest paused (qemuMigrationSrcPostcopyFailed)."""
    with log.open("rb") as f:
        f.seek(since)
        return b"failed during post-copy" in f.read()


def test_a_worker_killed_in_postcopy_recovers_it_when_restarted(lab: Lab) -> None:
    job_id = start_in_postcopy(lab)
    control.kill_worker("lab1")
    assert faults.reset_migration_stream("lab1", "lab2") >= 1
    wait_for(
        source_is(lab, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
        FAILURE_SEEN_S,
        "libvirt to see the post-copy fail",
    )
    control.restart_worker("lab1")
    resumed_and_landed(lab, job_id)


def test_abort_during_postcopy_is_refused(lab: Lab) -> None:
    job_id = start_in_postcopy(lab)
    with pytest.raises(SubmitError, match="post-copy"):
        lab.drover.abort(job_id)
    assert lab.drover.store.abort_requested(job_id) is None
    wait_for(lambda: speed_up_postcopy(lab), RECOVERY_S, "post-copy to be sped up")
    job = finish(lab, job_id)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert_invariants(lab, job, DOMAIN)


def test_past_the_deadline_the_job_says_where_the_guest_is_and_keeps_its_holds(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    fault_config(f"[tunables]\npostcopy_recovery_timeout = {SHORT_DEADLINE_S}\n")
    job_id = start_in_postcopy(lab)
    control.set_link("lab2", False)
    try:
        wait_for(
            lambda: lab.drover.job(job_id).state is JobState.POSTCOPY_PAUSED,
            KEEPALIVE_FAILURE_S,
            "drover to give the recovery up",
        )
        job = lab.drover.job(job_id)
        assert job.reason is not None, "a job drover gave up on must say why"
        assert "paused (post-copy failed) on lab1" in job.reason, job.reason
        assert "postcopy.unrecovered" in events_of(lab, job_id)
        store = lab.drover.store
        assert store.r.sismember(ACTIVE_JOBS, job_id), "the job must stay live"
        assert store.reserved_mib("lab2") > 0, "the destination's reservation must be kept"
        with pytest.raises(SubmitError, match="post-copy"):
            lab.drover.abort(job_id)
    finally:
        control.set_link("lab2", True)
    # Once the peers reach each other the post-copy goes on; the watchdog sees it land.
    wait_for(carried_to_the_end(lab, job_id), RECOVERY_S, "the post-copy to go on")
    job = finish(lab, job_id)
    assert job.state is JobState.SUCCEEDED, job.reason
    assert_invariants(lab, job, DOMAIN)
    assert lab.running_on(DOMAIN) == ["lab2"]
    states = [t.state for t in job.transitions]
    assert JobState.POSTCOPY_PAUSED in states, states


def failed_once_destroyed(lab: Lab, job_id: str, host: str) -> Job:
    """Destroy `host`'s copy of the guest in post-copy (as a crash or an OOM kill would); the
    job once it ended, failed."""
    conn = libvirt.open(lab.uri(host))
    try:
        conn.lookupByName(DOMAIN).destroy()
    finally:
        conn.close()
    wait_for(lambda: lab.drover.job(job_id).terminal, RECOVERY_S, "the job to end")
    job = lab.drover.job(job_id)
    assert job.state is JobState.FAILED, job.state
    return job


@pytest.mark.parametrize("defined_on_lab2", [False, True], ids=["transient", "defined"])
def test_a_destination_copy_destroyed_in_postcopy_fails_the_job_with_what_libvirt_shows(
    lab: Lab, defined_on_lab2: bool
) -> None:
    """lab2's copy, the guest's newest memory, is destroyed in post-copy (as a crash or an OOM
    kill would): no resume can land it. The job used to retry for an hour, then wait for ever,
    holding its lease, slots and lab2's reservation, its reason never updated. Now it fails
    with what libvirt shows, releases its holds, and resumes nothing on stale memory. Also
    when lab2 keeps a persistent definition of the guest, left shut off (fault probe)."""
    if defined_on_lab2:  # lab2 keeps a persistent definition, as the config table allows
        src, dst = libvirt.open(lab.uri("lab1")), libvirt.open(lab.uri("lab2"))
        try:
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE
            dst.defineXML(src.lookupByName(DOMAIN).XMLDesc(flags))
        finally:
            src.close()
            dst.close()
    job_id = start_in_postcopy(lab)
    try:
        job = failed_once_destroyed(lab, job_id, "lab2")
        assert job.reason is not None
        assert job.reason.startswith("post-copy cannot be resumed: lab2's copy is gone"), job.reason
        there = "shutoff" if defined_on_lab2 else "not defined"
        assert f"dirty-1 is paused (post-copy failed) on lab1, {there}" in job.reason
        assert "postcopy.lost" in events_of(lab, job_id)
        # libvirt on both hosts: the source's copy left paused (never resumed), none on lab2.
        assert source_state(lab) == (
            libvirt.VIR_DOMAIN_PAUSED,
            libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED,
        )
        assert lab.view("lab2", DOMAIN).exists == defined_on_lab2
        assert not lab.view("lab2", DOMAIN).active
        store = lab.drover.store
        wait_for(lambda: store.reserved_mib("lab2") == 0, RECOVERY_S, "lab2's booking to go")
        assert not store.r.sismember(ACTIVE_JOBS, job_id)
    finally:
        if defined_on_lab2:
            conn = libvirt.open(lab.uri("lab2"))
            try:
                conn.lookupByName(DOMAIN).undefine()
            finally:
                conn.close()
        # The operator's call: start the guest again from its disk on lab1.
        conn = libvirt.open(lab.uri("lab1"))
        try:
            dom = conn.lookupByName(DOMAIN)
            if dom.isActive():
                dom.destroy()
        finally:
            conn.close()
        lab.start_again(DOMAIN, "lab1")


def test_a_source_copy_destroyed_in_postcopy_fails_the_job_and_lab2_keeps_the_newest_memory(
    lab: Lab,
) -> None:
    """lab1's copy (the pages not yet sent) is destroyed in post-copy: the job fails with
    what libvirt shows. lab2's copy, the guest's newest memory, is kept for the operator,
    and its rollback ends: it used to be refused ("still coming in") every few seconds for
    as long as the copy was there (fault probe)."""
    job_id = start_in_postcopy(lab)
    try:
        job = failed_once_destroyed(lab, job_id, "lab1")
        assert str(job.reason).startswith(
            "post-copy cannot be resumed: lab1's copy no longer takes part"
        ), job.reason
        wait_for(lambda: "rollback.done" in events_of(lab, job_id), RECOVERY_S, "lab2's rollback")
        seen = events_of(lab, job_id)
        assert "rollback.kept_incoming" in seen and "rollback.refused" not in seen, seen
        assert lab.view("lab2", DOMAIN).active  # kept, as libvirt shows it
        assert not lab.view("lab1", DOMAIN).active
    finally:
        # The operator's call: drop lab2's copy, start the guest again from its disk on lab1.
        conn = libvirt.open(lab.uri("lab2"))
        try:
            conn.lookupByName(DOMAIN).destroy()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
        lab.start_again(DOMAIN, "lab1")
