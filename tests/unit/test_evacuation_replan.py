"""A child its destination's own pre-checks refused is placed elsewhere, not sent back to
the host that would refuse it again (worker/evacuation_children.py `destination_refusal`;
the whole retry against real hosts: tests/lab/test_evacuate.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from jobs.model import Job, PhaseRecord
from jobs.record import CheckVerdict, Result
from jobs.spec import MigrationSpec
from jobs.states import JobState
from worker.evacuation_children import destination_refusal

NOW = datetime(2026, 12, 5, tzinfo=UTC)


def child(verdicts: list[CheckVerdict], phases: tuple[str, ...] = ()) -> Job:
    spec = MigrationSpec(domain="web", src="kvm1", dst="kvm2", live=True)
    return Job(
        id="0123456789ab",
        spec=spec,
        state=JobState.FAILED,
        created=NOW,
        updated=NOW,
        parent="0a0a0a0a0a0a",
        phases={p: PhaseRecord(phase=p, host="kvm1", started=NOW) for p in phases},
        result=Result(destination_checks=verdicts),
    )


def refused(check: str, host: str = "kvm2") -> CheckVerdict:
    return CheckVerdict(check=check, host=host, passed=False, reason=f"{host}: {check} says no")


def test_what_the_destination_refused_is_what_sends_the_child_elsewhere() -> None:
    passed = CheckVerdict(check="cpu", host="kvm2", passed=True)
    job = child([passed, refused("anti_affinity"), refused("memory")])
    said = destination_refusal(job, "kvm2")
    assert said == "kvm2: anti_affinity says no; kvm2: memory says no"


def test_a_child_that_failed_otherwise_goes_back_where_it_was_planned() -> None:
    assert destination_refusal(child([]), "kvm2") is None  # e.g. libvirtd away: retried there
    assert (
        destination_refusal(child([CheckVerdict(check="cpu", host="kvm2", passed=True)]), "kvm2")
        is None
    )
    # Verdicts of another host (a plan rewritten since) say nothing of this one.
    assert destination_refusal(child([refused("memory", host="kvm3")]), "kvm2") is None
    # Past perform the pre-checks had passed: the migration itself failed.
    late = child([refused("memory")], phases=("source_preflight", "destination_prepare", "perform"))
    assert destination_refusal(late, "kvm2") is None


def test_a_domain_libvirt_cannot_show_a_job_for_has_none() -> None:
    """`has_job` (worker/libvirt_states.py) on what libvirt's test driver answers: it has no
    job information at all; an inactive domain, and one gone since it was looked up, have no
    job either. Never raised: the evacuation's watch asks it of every domain of its plan."""
    import libvirt

    from worker.libvirt_states import has_job

    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        assert dom.isActive() and not has_job(dom)  # the driver: "not supported"
        dom.destroy()
        assert not has_job(dom)
        dom.undefine()
        assert not has_job(dom)
    finally:
        conn.close()


def test_the_replanned_line_says_where_the_guest_goes_now() -> None:
    """`drover events EVAC` showed the reason only; the new destination was in the JSON alone."""
    from producer.render import event_line

    base = {"event": "evacuation.replanned", "host": "lab1", "ts": 0.0, "domain": "idle-2"}
    reason = "lab2's pre-checks refused it after planning: lab2 already has idle-2"
    line = event_line(base | {"was": "lab2", "dst": "lab3", "reason": reason})
    assert "idle-2: lab2 -> lab3 reason=lab2's pre-checks refused it" in line
    line = event_line(base | {"was": "lab2", "dst": None, "reason": reason})
    assert "idle-2: lab2 -> nowhere reason=" in line
