"""An evacuation whose host's worker is killed mid-drain still drains, within its limits.

The worker of the host being emptied plans the evacuation, runs every child's source phases
and watches the children. kill -9 it while children are migrating: peer-to-peer migrations
carry on inside libvirtd, the slots stay held (nothing else may start on lab1's behalf), and
the restarted worker re-attaches, finishes the children, starts the waiting ones and ends the
evacuation. Checked through libvirt: every guest on exactly one host, where the plan put it,
and never more migrations at once than the limits allow; nothing is left held in Redis.
"""

from __future__ import annotations

import pytest

from jobs.admission import CLUSTER_GATE, WAITING, inbound_gate, outbound_gate
from lab import control
from tests.faults.conftest import check
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
