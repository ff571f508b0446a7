"""An evacuation whose host's worker is killed mid-drain still drains, within its limits.

The worker of the host being emptied plans the evacuation, runs every child's source phases
and watches the children. kill -9 it while children are migrating: peer-to-peer migrations
carry on inside libvirtd, the slots stay held (nothing else may start on lab1's behalf), and
the restarted worker re-attaches, finishes the children, starts the waiting ones and ends the
evacuation. Checked through libvirt: every guest on exactly one host, where the plan put it,
and never more migrations at once than the limits allow; nothing is left held in Redis.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobs.admission import CLUSTER_GATE, WAITING, inbound_gate, outbound_gate
from jobs.states import EVACUATION_TERMINAL
from lab import control
from tests.faults.conftest import check, phase_started
from tests.support.forgery import worker_log
from tests.support.lab_fixtures import IDLE_GUESTS, JOB_TIMEOUT_S, Lab, wait_for
from tests.support.limits_sampler import LimitsSampler

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("workers_back")]

MAX_PARALLEL = 2
GUESTS = (*IDLE_GUESTS, "dirty-1")


def _children(lab: Lab, evacuation_id: str) -> str:
    """Where each child of an evacuation that did not end stands, and the end of lab1's
    worker log: what a timeout alone does not say."""
    d = lab.drover
    lines = []
    for domain, job_id in d.evacuation(evacuation_id).children.items():
        job = d.job(job_id)
        last = [e["event"] for e in d.events(job_id)][-4:]
        lines.append(f"{domain} {job_id} {job.state.value} {sorted(job.phases)} {last}")
    tail = worker_log("lab1").read_text().splitlines()[-12:]
    return "children:\n" + "\n".join(lines) + "\nlab1's worker log ends:\n" + "\n".join(tail)


def test_killing_the_evacuated_hosts_worker_mid_drain(lab: Lab) -> None:
    lab.all_home()
    d = lab.drover
    uris = {h: lab.uri(h) for h in lab.hosts()}
    try:
        with LimitsSampler(uris) as sampler:
            evacuation_id = d.evacuate(
                d.evacuation_spec(host="lab1", to=["lab2", "lab3"], max_parallel=MAX_PARALLEL)
            )

            def children_migrating() -> bool:
                ev = d.evacuation(evacuation_id)
                states = [d.job(j).state.value for j in ev.children.values()]
                return "migrating" in states

            wait_for(children_migrating, JOB_TIMEOUT_S, "a child migration in flight")
            control.kill_worker("lab1")
            # While lab1's worker is dead nothing new starts from lab1: the slots are held.
            held = d.admission.holders(outbound_gate("lab1"))
            check(1 <= len(held) <= MAX_PARALLEL, f"lab1 holds {len(held)} outbound slots")
            control.restart_worker("lab1")
            try:
                ev = d.wait_evacuation(evacuation_id, JOB_TIMEOUT_S)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}; {_children(lab, evacuation_id)}") from None
        check(ev.state.value == "drained", f"evacuation {ev.state.value}: {ev.reason}")
        planned = {p.domain: p.destination for p in ev.plan or []}
        check(set(planned) == set(GUESTS), f"planned {sorted(planned)}")
        for domain, destination in planned.items():
            where = lab.running_on(domain)
            check(where == [destination], f"{domain} runs on {where}, planned {destination}")
            check(not lab.view("lab1", domain).exists, f"{domain} still defined on lab1")
        check(sampler.max_outbound["lab1"] <= MAX_PARALLEL, f"{sampler.max_outbound}")
        check(all(n <= 2 for n in sampler.max_inbound.values()), f"{sampler.max_inbound}")
        store = d.store
        for gate in (outbound_gate("lab1"), inbound_gate("lab2"), inbound_gate("lab3")):
            check(not d.admission.holders(gate), f"{gate} still held")
        check(not d.admission.holders(CLUSTER_GATE), "a cluster slot is still held")
        check(not d.admission.waiting_ids(), "a job is still waiting")
        check(not store.r.zcard(WAITING), "a job is still in the old waiting line")
        for host in lab.hosts():
            check(store.reserved_mib(host) == 0, f"a reservation is left on {host}")
    finally:
        lab.all_home()
        lab.set_paused("dirty-1", True)


# The child's last phase (confirm, on the source) waits this long: the window in which its
# destination's libvirtd is stopped, after finish there verified the guest.
CONFIRM_DELAY_S = 5
# A frozen peer: how long one is asked (the least `peer_timeout` allows), and how long the
# evacuation waits for it, long enough to see the keeper's other duties go on meanwhile.
PEER_TIMEOUT_S = 3
FROZEN_CONFIRM_WAIT_S = 20


def _planning(lab: Lab, evacuation_id: str, host: str) -> str:
    """Where an evacuation stands, what it said, and the end of its host's worker log: what
    a missing child alone does not say."""
    ev = lab.drover.evacuation(evacuation_id)
    said = [str(e)[:400] for e in lab.drover.events(evacuation_id)]  # the plan's reasons too
    alive = control.status()["hosts"][host]["worker_alive"]
    tail = worker_log(host).read_text().splitlines()[-20:]
    return (
        f"evacuation {ev.state.value} ({ev.reason}); it said {said}; {host}'s worker "
        f"{'runs' if alive else 'is dead'}; its log ends:\n" + "\n".join(tail)
    )


def _evacuate_one_guest(
    lab: Lab,
    host: str,
    to: str,
    stop_when_confirming: str,
    fault: Callable[[str], None] = control.stop_libvirtd,
) -> str:
    """Evacuate `host` (one guest on it) to `to`, and stop (or otherwise `fault`)
    `stop_when_confirming`'s libvirtd once the child's guest is on its destination and its
    confirm phase has begun."""
    d = lab.drover
    evacuation_id = d.evacuate(d.evacuation_spec(host=host, to=[to]))

    def child_queued_or_ended() -> bool:
        ev = d.evacuation(evacuation_id)
        return bool(ev.children) or ev.state in EVACUATION_TERMINAL

    try:
        wait_for(child_queued_or_ended, JOB_TIMEOUT_S, f"{host}'s evacuation to queue its child")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {_planning(lab, evacuation_id, host)}") from None
    ev = d.evacuation(evacuation_id)
    queued = len(ev.children) == 1  # what it said is read only when it queued none
    check(queued, "" if queued else f"no child queued; {_planning(lab, evacuation_id, host)}")
    (child,) = ev.children.values()
    wait_for(phase_started(lab, child, "confirm"), JOB_TIMEOUT_S, "the child's confirm phase")
    fault(stop_when_confirming)
    return evacuation_id


def _said(lab: Lab, evacuation_id: str, name: str) -> list[dict[str, object]]:
    return [e for e in lab.drover.events(evacuation_id) if e["event"] == name]


def test_an_evacuation_never_says_more_than_an_unreachable_destination_said(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """Every child succeeded, but the destination's libvirtd is down when the evacuation
    confirms where its guest is. Still down after `evacuation_confirm_wait`: the evacuation
    ends partial, saying that the destination could not be asked (never that libvirt showed
    the guest nowhere). Back within it: the evacuation waits for its answer and ends drained.
    libvirt shows the guest running on its destination, and only there, either way."""
    d = lab.drover
    lab.all_home()
    moved = lab.migrate("idle-1", "lab1", "lab3")
    check(moved.state.value == "succeeded", f"idle-1 to lab3: {moved.reason}")
    stopped: list[str] = []
    try:
        # Still down at the end of the wait.
        fault_config(
            f"[faults.phase_delays]\nconfirm = {CONFIRM_DELAY_S}\n"
            "[tunables]\nevacuation_confirm_wait = 2\n"
        )
        first = _evacuate_one_guest(lab, "lab3", "lab2", stop_when_confirming="lab2")
        stopped.append("lab2")
        ev = d.wait_evacuation(first, JOB_TIMEOUT_S)
        check(ev.state.value == "partial", f"evacuation {ev.state.value}: {ev.reason}")
        reason = ev.reason or ""
        check("lab2's libvirtd could not be asked" in reason, reason)
        check("neither here nor" not in reason, reason)
        (outcome,) = ev.outcome
        check(outcome.destination_unreachable is not None and not outcome.moved, str(outcome))
        check(len(_said(lab, first, "evacuation.confirm_deferred")) == 1, "deferred once")
        control.start_libvirtd("lab2")
        stopped.remove("lab2")
        where = lab.running_on("idle-1")
        check(where == ["lab2"], f"idle-1 runs on {where}")
        check(not lab.view("lab3", "idle-1").exists, "idle-1 still defined on lab3")

        # Back within the wait.
        fault_config(f"[faults.phase_delays]\nconfirm = {CONFIRM_DELAY_S}\n")
        d.set_host_enabled("lab3", True)  # the first evacuation left it in maintenance
        second = _evacuate_one_guest(lab, "lab2", "lab3", stop_when_confirming="lab3")
        stopped.append("lab3")

        def deferred() -> bool:
            return bool(_said(lab, second, "evacuation.confirm_deferred"))

        wait_for(deferred, JOB_TIMEOUT_S, "the evacuation to wait for lab3's libvirtd")
        waiting = d.evacuation(second)
        check(waiting.state.value == "running", f"evacuation {waiting.state.value} while waiting")
        control.start_libvirtd("lab3")
        stopped.remove("lab3")
        ev = d.wait_evacuation(second, JOB_TIMEOUT_S)
        check(ev.state.value == "drained", f"evacuation {ev.state.value}: {ev.reason}")
        where = lab.running_on("idle-1")
        check(where == ["lab3"], f"idle-1 runs on {where}")
        check(not lab.view("lab2", "idle-1").exists, "idle-1 still defined on lab2")
    finally:
        for host in stopped:
            control.start_libvirtd(host)
        fault_config("")
        lab.all_home()


def _reported(lab: Lab, host: str) -> str:
    """When `host`'s worker last reported the host (its keeper's `report` duty)."""
    (row,) = [r for r in lab.drover.hosts() if r["host"] == host]
    return str(row["reported"] or "")


def test_a_frozen_destination_libvirtd_holds_up_only_what_needs_its_answer(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """The destination's libvirtd freezes (SIGSTOP, as one stuck on a lock) when the
    evacuation confirms where its guest is: it still accepts connections and never answers.
    The evacuation asks it for at most `peer_timeout`, says it could not be asked, and ends
    partial after `evacuation_confirm_wait`; meanwhile the same keeper goes on with its other
    duties (lab3's host report keeps coming). Thawed, libvirt shows the guest on lab2 only."""
    d = lab.drover
    lab.all_home()
    moved = lab.migrate("idle-1", "lab1", "lab3")
    check(moved.state.value == "succeeded", f"idle-1 to lab3: {moved.reason}")
    try:
        fault_config(
            f"[faults.phase_delays]\nconfirm = {CONFIRM_DELAY_S}\n"
            f"[tunables]\nevacuation_confirm_wait = {FROZEN_CONFIRM_WAIT_S}\n"
            f"peer_timeout = {PEER_TIMEOUT_S}\n"
        )
        evacuation_id = _evacuate_one_guest(
            lab, "lab3", "lab2", stop_when_confirming="lab2", fault=control.freeze_libvirtd
        )

        def deferred() -> bool:
            return bool(_said(lab, evacuation_id, "evacuation.confirm_deferred"))

        wait_for(deferred, JOB_TIMEOUT_S, "the evacuation to wait for lab2's frozen libvirtd")
        before = _reported(lab, "lab3")
        wait_for(
            lambda: _reported(lab, "lab3") > before,
            FROZEN_CONFIRM_WAIT_S / 2,
            "lab3's worker to report its host while lab2's libvirtd is frozen",
        )
        waiting = d.evacuation(evacuation_id)
        check(waiting.state.value == "running", f"evacuation {waiting.state.value} while waiting")
        ev = d.wait_evacuation(evacuation_id, JOB_TIMEOUT_S)
        check(ev.state.value == "partial", f"evacuation {ev.state.value}: {ev.reason}")
        reason = ev.reason or ""
        check("lab2's libvirtd could not be asked" in reason and "answer" in reason, reason)
        (outcome,) = ev.outcome
        check(outcome.destination_unreachable is not None and not outcome.moved, str(outcome))
        control.thaw_libvirtd("lab2")
        where = lab.running_on("idle-1")
        check(where == ["lab2"], f"idle-1 runs on {where}")
        check(not lab.view("lab3", "idle-1").exists, "idle-1 still defined on lab3")
    finally:
        control.thaw_libvirtd("lab2")
        fault_config("")
        lab.all_home()
