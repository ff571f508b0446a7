"""Faults landed mid-flight on the real lab; the invariants hold after every one of them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from config.celery import host_queue
from jobs.admission import CLUSTER_GATE, inbound_gate, outbound_gate
from jobs.phases import Phase, task_name
from lab import control
from lab.faults import established
from producer.api import SubmitError
from tests.faults.conftest import (
    FAULT_WINDOW_S,
    assert_invariants,
    finish,
    phase_started,
    start_throttled,
)
from tests.support.forgery import worker_log
from tests.support.lab_fixtures import Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("dirty_home", "workers_back")]


def events_named(lab: Lab, job_id: str, name: str) -> list[dict[str, object]]:
    return [e for e in lab.drover.events(job_id) if e["event"] == name]


@pytest.mark.parametrize("control_flow", ["p2p", "direct"])
def test_source_worker_killed_during_perform(lab: Lab, control_flow: str) -> None:
    job_id = start_throttled(lab, control=control_flow)
    control.kill_worker("lab1")
    control.restart_worker("lab1")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    if control_flow == "p2p":
        # libvirtd carried on without its worker; the restarted worker finished the job.
        assert job.state.value == "succeeded", job.reason
        assert events_named(lab, job_id, "phase.recovering")
    else:
        # libvirt aborts a managed-direct migration when its client dies (it may also have
        # completed just before): either way the invariants above hold.
        assert job.state.value in ("succeeded", "failed"), job.reason


@pytest.mark.parametrize("phase", ["destination_prepare", "finish"])
def test_destination_worker_killed_inside_a_phase(
    lab: Lab, fault_config: Callable[[str], None], phase: str
) -> None:
    fault_config(f"[faults.phase_delays]\n{phase} = 30")
    job_id = lab.drover.submit(
        domain="dirty-1", src="lab1", dst="lab2", live=True, auto_converge=True
    )
    wait_for(phase_started(lab, job_id, phase), FAULT_WINDOW_S, f"{phase} to start")
    control.kill_worker("lab2")
    fault_config("")  # the restarted worker must not sleep again
    control.restart_worker("lab2")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason
    assert events_named(lab, job_id, "phase.recovering")


def test_redis_restarted_during_perform(lab: Lab) -> None:
    job_id = start_throttled(lab)
    control.restart_redis()
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason


def test_link_cut_during_perform_then_a_retry_succeeds(lab: Lab) -> None:
    job_id = start_throttled(lab)
    control.set_link("lab2", False)
    # Give the cut time to bite (the job may fail); if it is still migrating after that, the
    # restored link may let it finish.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: lab.drover.job(job_id).terminal, 8, "the link cut to bite")
    control.set_link("lab2", True)
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    if job.state.value != "succeeded":
        retry = finish(
            lab,
            lab.drover.submit(
                domain="dirty-1", src="lab1", dst="lab2", live=True, auto_converge=True
            ),
        )
        assert_invariants(lab, retry)
        assert retry.state.value == "succeeded", retry.reason


def test_source_libvirtd_restarted_during_perform(lab: Lab) -> None:
    job_id = start_throttled(lab)
    control.restart_libvirtd("lab1")
    job = finish(lab, job_id)
    assert_invariants(lab, job)


def test_a_phase_message_delivered_twice_runs_once(lab: Lab) -> None:
    job_id = start_throttled(lab)
    # The same perform message again, straight onto the source host's queue.
    lab.drover.send(
        lab.drover._app.signature(
            task_name(Phase.PERFORM), args=(job_id,), queue=host_queue("lab1")
        )
    )

    # The copy is refused by the phase's claim, or, if the job finished first, as too late.
    def refused() -> bool:
        names = {e["event"] for e in lab.drover.events(job_id) if e.get("phase") == "perform"}
        return bool(names & {"phase.duplicate", "phase.skipped"})

    wait_for(refused, 30, "the copy to be refused")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "succeeded", job.reason
    assert len(events_named(lab, job_id, "migration.started")) == 1


def test_abort_while_migrating(lab: Lab) -> None:
    job_id = start_throttled(lab, bandwidth_mib=8)  # would never converge
    assert "abort requested" in lab.drover.abort(job_id)
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "cancelled"
    assert job.reason is not None and "aborted by operator" in job.reason


@pytest.mark.parametrize("phase", ["source_preflight", "destination_prepare"])
def test_abort_before_the_migration_starts(
    lab: Lab, fault_config: Callable[[str], None], phase: str
) -> None:
    fault_config(f"[faults.phase_delays]\n{phase} = 5")
    job_id = lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
    wait_for(phase_started(lab, job_id, phase), FAULT_WINDOW_S, f"{phase} to start")
    assert "cancelled" in lab.drover.abort(job_id)
    job = finish(lab, job_id)
    wait_for(lambda: lab.drover.store.reserved_mib("lab2") == 0, 30, "the reservation to go")
    assert_invariants(lab, job)
    assert job.state.value == "cancelled"
    assert not events_named(lab, job_id, "migration.started")


def _standing(lab: Lab, job_id: str) -> str:
    """Where a job stands, for a case whose premise failed: its state, its events, who holds
    the admission gates it needs, what waits in line, how kombu routes to its source's queue
    (a message with no binding to follow goes nowhere a worker reads), who is connected to
    Redis, and what the workers logged of the job."""
    job = lab.drover.store.get(job_id)
    gates = (CLUSTER_GATE, outbound_gate(job.spec.src), inbound_gate(job.spec.dst))
    held = {gate: sorted(lab.drover.admission.holders(gate)) for gate in gates}
    seen = [e["event"] for e in lab.drover.events(job_id)]
    waiting = lab.drover.admission.waiting_ids()
    queue = host_queue(job.spec.src)
    routes = lab.drover.store.r.smembers(f"_kombu.binding.{queue}")  # kombu's routing table
    port = urlsplit(lab.drover.settings.redis_url).port
    clients = sorted(f"{c.peer} (send-q {c.send_q})" for c in established() if c.local_port == port)
    logs = {h: worker_log(h).read_text().splitlines() for h in lab.hosts()}
    mentions = {h: [ln for ln in lines if job_id in ln][:5] for h, lines in logs.items()}
    return (
        f"job {job.state.value}, events {seen}, gates held {held}, waiting {waiting}, "
        f"{queue}'s bindings {sorted(routes)}, Redis's established clients {clients}, "
        f"the job in the workers' logs {mentions}; {job.spec.src}'s log ends:\n"
        + "\n".join(logs[job.spec.src][-12:])
    )


def test_abort_of_a_queued_job_means_it_never_starts(lab: Lab) -> None:
    queue = host_queue("lab1")
    r = lab.drover.store.r
    control.kill_worker("lab1")  # nothing consumes lab1's queue: the job stays queued
    before = r.llen(queue)  # what an earlier case left there (the producer may only count)
    job_id = lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)

    def waiting() -> bool:
        """One more message in lab1's queue than before the submit: this job's."""
        return bool(r.llen(queue) > before)

    # The case's premise, checked rather than assumed: admitted, its first phase's message
    # waiting in lab1's queue (if the submit's own start failed, a worker's tick sends it).
    try:
        wait_for(waiting, 30, f"job {job_id}'s message in {queue}")
    except AssertionError:
        raise AssertionError(
            f"{queue} holds {r.llen(queue)}, {before} before the submit; " + _standing(lab, job_id)
        ) from None
    assert "cancelled (queued)" in lab.drover.abort(job_id)
    assert waiting(), "the message left lab1's queue with no worker there"
    control.restart_worker("lab1")
    try:
        wait_for(
            lambda: bool(events_named(lab, job_id, "phase.skipped")),
            30,
            "the queued message to be dropped",
        )
    except AssertionError:
        seen = [e["event"] for e in lab.drover.events(job_id)]
        tail = worker_log("lab1").read_text().splitlines()[-15:]
        raise AssertionError(
            f"no phase.skipped for {job_id}: {queue} holds {r.llen(queue)}, events {seen}, "
            "lab1's worker log ends:\n" + "\n".join(tail)
        ) from None
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    assert job.state.value == "cancelled"
    assert job.phases == {}  # not one phase ran


def test_abort_of_a_finished_job_says_so(lab: Lab) -> None:
    job = finish(
        lab,
        lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True, auto_converge=True),
    )
    assert job.state.value == "succeeded", job.reason
    with pytest.raises(SubmitError, match="already succeeded; nothing to abort"):
        lab.drover.abort(job.id)
    assert_invariants(lab, job)


def test_second_job_for_the_same_domain_is_refused(lab: Lab) -> None:
    job_id = start_throttled(lab)
    with pytest.raises(SubmitError, match=f"dirty-1 already has an active job {job_id}"):
        lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
    job = finish(lab, job_id)
    assert_invariants(lab, job)
