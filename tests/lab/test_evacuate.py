"""Draining a host in the real lab: plans, limits, maintenance, partial ends and aborts.

Every claim is checked through libvirt on the hosts themselves: where each guest runs, that
nothing of it is left on the drained host, and (sampled while the evacuation runs) that no
host ever had more migrations going out or coming in than its limits allow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from config.settings import load_settings
from jobs.evacuation import Evacuation
from jobs.host_facts import HostFacts, read_facts
from jobs.keys import job_key, outbound_gate, phases_key
from jobs.record import CheckVerdict
from lab.guests import GuestSpec, domain_xml
from producer.api import Drover, SubmitError
from tests.support.cli import run_drover
from tests.support.controls import when_free
from tests.support.lab_fixtures import IDLE_GUESTS, JOB_TIMEOUT_S, Lab, replace_config, wait_for
from tests.support.limits_sampler import LimitsSampler
from worker.fleet_view import PLACEMENT_NS
from worker.libvirt_host import STATE_NAMES

pytestmark = pytest.mark.lab

GUESTS = (*IDLE_GUESTS, "dirty-1")
MAX_PARALLEL = 2
FACTS_MAX_AGE_S, FACTS_SKEW_S = 15.0, 5.0  # the tunables' defaults (host_facts_ttl, max_skew)
ACTIVE = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
DEFAULT_LIMIT = 2  # max_outbound / max_inbound in the lab's registry (the defaults)


@pytest.fixture
def home(lab: Lab) -> Iterator[None]:
    """Every guest on lab1 and every host enabled, before and after the test."""
    lab.all_home()
    yield
    lab.all_home()


def uris(lab: Lab) -> dict[str, str]:
    return {h: lab.uri(h) for h in lab.hosts()}


def libvirt_state(lab: Lab, host: str, domain: str) -> str:
    """The domain's state on `host` as libvirt names it to drover (worker/libvirt_host.py)."""
    state = lab.view(host, domain).state
    assert state is not None, f"{domain} is not on {host}"
    return STATE_NAMES[state]


def evacuate(lab: Lab, **request: object) -> Evacuation:
    d = lab.drover
    return d.wait_evacuation(d.evacuate(d.evacuation_spec(**request)), JOB_TIMEOUT_S)


def _facts_match_libvirt(lab: Lab) -> bool:
    facts = read_facts(lab.drover.store.r, lab.hosts(), FACTS_MAX_AGE_S, FACTS_SKEW_S)
    for host in lab.hosts():
        record = facts[host]
        if not isinstance(record, HostFacts):
            return False
        conn = libvirt.open(lab.uri(host))
        try:
            running = sorted(d.name() for d in conn.listAllDomains(ACTIVE))
        finally:
            conn.close()
        if sorted(d.name for d in record.domains) != running:
            return False
    return True


def test_workers_publish_their_hosts_facts_as_libvirt_shows_them(lab: Lab, home: None) -> None:
    # The report duty runs every couple of seconds: the facts catch up with libvirt.
    wait_for(lambda: _facts_match_libvirt(lab), FACTS_MAX_AGE_S, "facts matching libvirt")
    facts = read_facts(lab.drover.store.r, lab.hosts(), FACTS_MAX_AGE_S, FACTS_SKEW_S)
    for host in lab.hosts():
        record = facts[host]
        assert isinstance(record, HostFacts) and record.host == host
        qemu = record.cpu("qemu")  # the lab's guests run under TCG
        assert qemu is not None and "qemu64" in qemu.usable_models, qemu
        assert "Icelake-Server" not in qemu.usable_models
        assert {"hypervisor", "lahf_lm"} <= qemu.features  # what a running qemu64 requires
        assert record.free_mib > 0


def test_evacuation_drains_lab1_within_limits_as_the_dry_run_planned(lab: Lab, home: None) -> None:
    request = {"host": "lab1", "to": ["lab2", "lab3"], "max_parallel": MAX_PARALLEL}
    dry = evacuate(lab, **request, dry_run=True)
    assert dry.state.value == "planned"
    planned = {p.domain: p.destination for p in dry.plan or []}
    assert set(planned) == set(GUESTS) and set(planned.values()) == {"lab2", "lab3"}
    assert all(p.estimate_s and p.estimate_s > 0 for p in dry.plan or [])
    assert not dry.children and lab.running_on("idle-1") == ["lab1"]  # nothing queued

    with LimitsSampler(uris(lab)) as sampler:
        ev = evacuate(lab, **request)
    assert ev.state.value == "drained", ev.reason
    assert {p.domain: p.destination for p in ev.plan or []} == planned
    for domain, destination in planned.items():
        assert lab.running_on(domain) == [destination], domain
        assert lab.view(destination, domain).persistent, domain
        assert not lab.view("lab1", domain).exists, f"{domain} still defined on lab1"
    assert all(o.running_on == planned[o.domain] and not o.on_source for o in ev.outcome)
    assert {o.domain: o.destination_state for o in ev.outcome} == {
        d: libvirt_state(lab, there, d) for d, there in planned.items()
    }

    # Limits, as libvirt itself showed them while the evacuation ran.
    assert sampler.samples > 10
    assert sampler.max_outbound["lab1"] <= MAX_PARALLEL, sampler.max_outbound
    assert 1 <= sampler.max_total <= MAX_PARALLEL, sampler.max_total
    # Parallelism itself, from the jobs' own records: libvirt shows a guest in flight for
    # only ~0.2 s of its ~2 s migration, too short for a sampler to be sure to catch two.
    children = [lab.drover.job(j) for j in ev.children.values()]
    performs = [(c.phases["perform"].started, c.phases["perform"].ended) for c in children]
    overlapping = max(
        sum(1 for a, b in performs if a <= start and (b is None or start < b))
        for start, _ in performs
    )
    assert overlapping == MAX_PARALLEL, performs
    assert all(n <= DEFAULT_LIMIT for n in sampler.max_inbound.values()), sampler.max_inbound

    events = list(lab.drover.events(ev.id))
    names = [e["event"] for e in events]
    assert names.count("evacuation.child_queued") == len(GUESTS)
    assert names.count("evacuation.child_ended") == len(GUESTS)
    assert events[-1]["event"] == "evacuation.state" and events[-1]["state"] == "drained"
    # The host stays in maintenance after the drain, and says why.
    lab1 = next(h for h in lab.drover.hosts() if h["host"] == "lab1")
    assert lab1["state"] == "disabled" and ev.id in lab1["disabled_reason"]
    listed = {j.id: j.summary()["state"] for j in lab.drover.jobs(20)}
    assert listed[ev.id] == "drained"
    assert all(listed[c] == "succeeded" for c in ev.children.values())
    # The same through the CLI an operator uses.
    shown = json.loads(run_drover(lab.config, "job", ev.id, "--json").stdout)
    assert shown["state"] == "drained" and set(shown["children"]) == set(GUESTS)
    lines = run_drover(lab.config, "events", ev.id, "--json").stdout.splitlines()
    assert json.loads(lines[-1])["state"] == "drained"
    rows = json.loads(run_drover(lab.config, "jobs", "--json", "--limit", "20").stdout)
    row = next(r for r in rows if r["id"] == ev.id)
    assert (row["kind"], row["state"]) == ("evacuation", "drained")


@pytest.fixture
def limits(lab_config_file: Path) -> Path:
    """The registry file, restored after the test changed limits in it (workers re-read it)."""
    return lab_config_file


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("\n[cluster]\nmax_migrations = 1\n", "cluster-wide limit 1 reached"),
        ("", "lab1 outbound limit 1 reached"),
    ],
    ids=["cluster", "outbound"],
)
def test_single_migrations_wait_for_a_slot(
    lab: Lab, home: None, limits: Path, extra: str, reason: str
) -> None:
    text = limits.read_text()
    if not extra:
        block = "[hosts.lab1.limits]\n"
        assert block in text
        text = text.replace(block, block + "max_outbound = 1\n")
    limits.write_text(text + extra)
    drover = Drover(load_settings(limits))  # producers read the limits too (admission)
    with LimitsSampler(uris(lab)) as sampler:
        first = drover.submit(domain="idle-1", src="lab1", dst="lab2", live=True)
        second = drover.submit(domain="idle-2", src="lab1", dst="lab3", live=True)
        wait_for(
            lambda: drover.job(second).waiting_for is not None,
            JOB_TIMEOUT_S,
            "the second job to wait for a slot",
        )
        assert reason in (drover.job(second).waiting_for or "")
        jobs = [drover.wait(j, JOB_TIMEOUT_S) for j in (first, second)]
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"]
    assert sampler.max_total <= 1, "two migrations ran at once under a limit of one"
    # The second started only after the first had ended.
    assert jobs[1].admitted is not None and jobs[1].admitted >= jobs[0].updated
    waiting = [e for e in drover.events(second) if e["event"] == "job.waiting"]
    assert waiting and reason in waiting[0]["reason"]
    assert lab.running_on("idle-1") == ["lab2"] and lab.running_on("idle-2") == ["lab3"]


def test_slot_sets_deleted_let_no_host_exceed_its_own_limits(
    lab: Lab, home: None, limits: Path
) -> None:
    """lab1 may send one guest at a time. While it sends dirty-1 (paused, 128 MiB at
    1 MiB/s: long enough), idle-1 waits for the slot; then the attacker deletes lab1's
    outbound slot set, and admission lets idle-1 in. lab1's worker counts what it sends
    itself (its ledger, checked against its libvirtd): idle-1 waits at its perform, and
    leaves only when dirty-1's migration is over (aborted here). libvirt never shows two
    guests leaving lab1 at once."""
    block = "[hosts.lab1.limits]\n"
    text = limits.read_text()
    assert block in text
    limits.write_text(text.replace(block, block + "max_outbound = 1\n"))
    drover = Drover(load_settings(limits))
    with LimitsSampler(uris(lab)) as sampler:
        slow = drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True, bandwidth_mib=1)
        wait_for(lambda: drover.job(slow).state.value == "migrating", JOB_TIMEOUT_S, "dirty-1")
        then = drover.submit(domain="idle-1", src="lab1", dst="lab3", live=True)
        wait_for(
            lambda: "lab1 outbound limit 1 reached" in (drover.job(then).waiting_for or ""),
            JOB_TIMEOUT_S,
            "idle-1 to wait for lab1's slot",
        )
        drover.store.r.delete(outbound_gate("lab1"))  # the attacker, with a Redis password

        def held_by_lab1() -> bool:
            return any(
                e["event"] == "job.waiting" and e["host"] == "lab1" for e in drover.events(then)
            )

        wait_for(held_by_lab1, JOB_TIMEOUT_S, "lab1's worker to hold idle-1 at its perform")
        assert drover.job(slow).state.value == "migrating"
        assert lab.running_on("idle-1") == ["lab1"]
        drover.abort(slow)
        moved, aborted = drover.wait(then, JOB_TIMEOUT_S), drover.wait(slow, JOB_TIMEOUT_S)
    assert (moved.state.value, aborted.state.value) == ("succeeded", "cancelled"), moved.reason
    assert lab.running_on("idle-1") == ["lab3"] and lab.view("lab1", "dirty-1").exists
    assert sampler.max_outbound["lab1"] == 1, "two guests left lab1 at once"
    (held,) = [
        e for e in drover.events(then) if e["event"] == "job.waiting" and e["host"] == "lab1"
    ]
    assert held["reason"] == f"lab1 already sends 1 guests ({slow}); its max_outbound is 1"


def test_disabled_host_is_never_a_destination(lab: Lab, home: None) -> None:
    d = lab.drover
    assert "lab2 disabled" in d.set_host_enabled("lab2", False, "firmware update")
    with pytest.raises(SubmitError, match="lab2 is disabled for maintenance"):
        d.submit(domain="idle-1", src="lab1", dst="lab2", live=True)
    dry = evacuate(lab, host="lab1", dry_run=True)
    assert {p.destination for p in dry.plan or []} == {"lab3"}
    rows = {h["host"]: h for h in d.hosts()}
    assert rows["lab2"]["state"] == "disabled"
    assert rows["lab2"]["disabled_reason"] == "firmware update"
    assert rows["lab1"]["worker_alive"] and set(GUESTS) <= set(rows["lab1"]["running"])
    assert lab.running_on("idle-1") == ["lab1"]


def _set_group(lab: Lab, host: str, domain: str, group: str) -> None:
    conn = libvirt.open(lab.uri(host))
    try:
        conn.lookupByName(domain).setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            f'<placement group="{group}"/>',
            "drover",
            PLACEMENT_NS,
            libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
    finally:
        conn.close()


def _clear_group(lab: Lab, domain: str) -> None:
    for host in lab.running_on(domain):
        conn = libvirt.open(lab.uri(host))
        try:
            conn.lookupByName(domain).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                None,
                None,
                PLACEMENT_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )
        finally:
            conn.close()


def test_anti_affinity_that_cannot_be_met_ends_partial_with_the_reason(
    lab: Lab, home: None
) -> None:
    for domain in ("idle-1", "idle-2"):
        _set_group(lab, "lab1", domain, "web")
    try:
        # No --max-parallel: lab1's outbound and lab2's inbound limits (2) are what bind.
        with LimitsSampler(uris(lab)) as sampler:
            ev = evacuate(lab, host="lab1", to=["lab2"])
        assert sampler.max_outbound["lab1"] <= DEFAULT_LIMIT, sampler.max_outbound
        assert sampler.max_inbound["lab2"] <= DEFAULT_LIMIT, sampler.max_inbound
        assert ev.state.value == "partial"
        plan = {p.domain: p for p in ev.plan or []}
        unplaced = [p for p in plan.values() if p.destination is None]
        assert [p.domain for p in unplaced] == ["idle-2"]
        assert "anti-affinity group web already there" in (unplaced[0].reason or "")
        assert "idle-2" in (ev.reason or "") and "not moved off lab1" in (ev.reason or "")
        assert lab.running_on("idle-2") == ["lab1"]
        for domain in GUESTS:
            if domain != "idle-2":
                assert lab.running_on(domain) == ["lab2"], domain
    finally:
        for domain in ("idle-1", "idle-2"):
            _clear_group(lab, domain)


SLOW_DRAIN_MIB = 8  # dirty-1 (paused, 128 MiB) takes about 16 s to move at this cap
# How long each child's prepare waits before its checks (the fault suite's hook): the window
# in which the test enables lab3 once the plan is made.
PREPARE_HELD_S = 4


def test_a_child_its_destination_refuses_is_placed_on_another_host(
    lab: Lab, home: None, lab_config_file: Path
) -> None:
    """Probe: the planner placed a guest where the destination's own pre-checks then refused
    it (libvirt there knew what the published facts did not), and the evacuation queued it
    again to the same host, which refused it again: the guest stayed behind, `partial`. A
    child refused by its destination's pre-checks is placed anew, that host left out, as
    Nova's scheduler retries a live migration elsewhere. Here lab2 holds a different domain
    named idle-2 (its `definition` check refuses); lab3 was in maintenance at planning."""
    d = lab.drover
    replace_config(
        lab_config_file,
        lab_config_file.read_text()
        + f"\n[faults.phase_delays]\ndestination_prepare = {PREPARE_HELD_S}\n",
    )
    clash = domain_xml(GuestSpec("idle-2", 64))  # same name, a uuid of its own
    conn = libvirt.open(lab.uri("lab2"))
    try:
        conn.defineXML(clash)
    finally:
        conn.close()
    try:
        assert "lab3 disabled" in d.set_host_enabled("lab3", False, "until planned")
        ev_id = d.evacuate(d.evacuation_spec(host="lab1", to=["lab2", "lab3"]))
        wait_for(lambda: d.evacuations.get(ev_id).plan is not None, JOB_TIMEOUT_S, "the plan")
        planned = {p.domain: p.destination for p in d.evacuations.get(ev_id).plan or []}
        assert planned == dict.fromkeys(GUESTS, "lab2")  # lab3 was in maintenance
        d.set_host_enabled("lab3", True)
        ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)
        assert ev.state.value == "drained", ev.reason
        assert lab.running_on("idle-2") == ["lab3"] and not lab.view("lab1", "idle-2").exists
        for domain in GUESTS:
            if domain != "idle-2":
                assert lab.running_on(domain) == ["lab2"], domain
        plan = {p.domain: p for p in ev.plan or []}
        assert plan["idle-2"].destination == "lab3"
        assert "different domain named idle-2" in plan["idle-2"].refused_by["lab2"]
        [replanned] = [e for e in d.events(ev_id) if e["event"] == "evacuation.replanned"]
        assert (replanned["was"], replanned["dst"]) == ("lab2", "lab3")
        assert "lab2's pre-checks refused it" in replanned["reason"]
        outcome = {o.domain: o for o in ev.outcome}
        assert outcome["idle-2"].moved and outcome["idle-2"].running_on == "lab3"
    finally:
        conn = libvirt.open(lab.uri("lab2"))
        try:
            for dom in conn.listAllDomains():
                if dom.name() == "idle-2" and not dom.isActive():
                    dom.undefine()  # the clash, never the guest itself
        finally:
            conn.close()


def test_a_re_placed_guest_never_joins_a_member_of_its_group_the_plan_sends_there(
    lab: Lab, home: None
) -> None:
    """Probe: dirty-1 and idle-1 share an anti-affinity group; the plan sends them to
    different hosts, and dirty-1's destination refuses it (a different domain has its name
    there). The re-placement sent it where idle-1 was going (it counted other evacuations'
    groups only), which ran both there when that host's prepares came back to back. Now it
    counts its own plan's: there is no host left for dirty-1, which stays on lab1."""
    d = lab.drover
    decoy_on: list[str] = []
    for domain in ("dirty-1", "idle-1"):
        _set_group(lab, "lab1", domain, "g")
    try:
        dry = evacuate(lab, host="lab1", to=["lab2", "lab3"], dry_run=True)
        planned = {p.domain: p.destination for p in dry.plan or []}
        first, other = planned["dirty-1"], planned["idle-1"]
        assert first is not None and other is not None and first != other
        conn = libvirt.open(lab.uri(first))
        try:
            conn.defineXML(domain_xml(GuestSpec("dirty-1", 64)))  # same name, its own uuid
            decoy_on.append(first)
        finally:
            conn.close()
        ev = evacuate(lab, host="lab1", to=["lab2", "lab3"])
        assert ev.state.value == "partial", ev.reason
        [again] = [e for e in d.events(ev.id) if e["event"] == "evacuation.replanned"]
        assert (again["was"], again["dst"]) == (first, None), again
        assert "anti-affinity group g already there" in again["reason"]
        assert lab.running_on("dirty-1") == ["lab1"] and lab.running_on("idle-1") == [other]
    finally:
        for domain in ("dirty-1", "idle-1"):
            _clear_group(lab, domain)
        for host in decoy_on:
            conn = libvirt.open(lab.uri(host))
            try:
                for dom in conn.listAllDomains():
                    if dom.name() == "dirty-1" and not dom.isActive():
                        dom.undefine()  # the decoy, never the guest itself (it runs)
            finally:
                conn.close()


def test_a_child_written_failed_in_redis_mid_migration_is_not_retried_nor_judged_early(
    lab: Lab, home: None
) -> None:
    """Attacker probe, with the producer's password: while dirty-1's child migrated, its
    record was written `failed`, its perform phase deleted and a destination verdict forged.
    The evacuation re-placed the guest (a second child followed the first one's migration)
    and ended `partial`, the guest said to be on lab1 while libvirt went on to land it. Now
    libvirt's word counts: the child is not retried while libvirt migrates it, and the
    evacuation is judged once that ends."""
    d = lab.drover
    ev_id = d.evacuate(d.evacuation_spec(host="lab1", to=["lab3"], bandwidth_mib=SLOW_DRAIN_MIB))

    def dirty_child_migrating() -> bool:
        child = d.evacuations.get(ev_id).children.get("dirty-1")
        return child is not None and d.job(child).state.value == "migrating"

    wait_for(dirty_child_migrating, JOB_TIMEOUT_S, "dirty-1's child migrating")
    child = d.evacuations.get(ev_id).children["dirty-1"]
    forged = d.job(child).result.model_copy(
        update={
            "destination_checks": [
                CheckVerdict(check="memory", host="lab3", passed=False, reason="forged")
            ]
        }
    )
    r = d.store.r
    r.hset(job_key(child), mapping={"state": "failed", "reason": "forged"})
    r.hset(job_key(child), "result", forged.model_dump_json())
    r.hdel(phases_key(child), "perform")
    ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)
    assert ev.state.value == "drained", ev.reason
    assert lab.running_on("dirty-1") == ["lab3"] and not lab.view("lab1", "dirty-1").exists
    assert set(ev.children) == set(GUESTS)  # no second child of dirty-1
    said = [e for e in d.events(ev_id) if e.get("domain") == "dirty-1"]
    names = [e["event"] for e in said]
    assert "evacuation.replanned" not in names, names
    assert any("still migrates it" in str(e.get("reason")) for e in said), said


def test_aborted_evacuation_leaves_every_vm_on_exactly_one_host(
    lab: Lab, home: None, dirty_running: None
) -> None:
    d = lab.drover
    # dirty-1 goes first (largest first) and, capped at 8 MiB/s under the manual policy (no
    # switch to post-copy), cannot converge: the abort finds it mid-migration with the idle
    # guests still waiting for the one slot.
    evacuation_id = d.evacuate(
        d.evacuation_spec(
            host="lab1", to=["lab2", "lab3"], max_parallel=1, bandwidth_mib=8, policy="manual"
        )
    )

    def dirty_migrating() -> bool:
        ev = d.evacuation(evacuation_id)
        child = ev.children.get("dirty-1")
        return child is not None and d.job(child).state.value == "migrating"

    wait_for(dirty_migrating, JOB_TIMEOUT_S, "dirty-1's migration to start")
    assert "abort requested" in d.abort(evacuation_id)
    ev = d.wait_evacuation(evacuation_id, JOB_TIMEOUT_S)
    assert ev.state.value == "cancelled"
    children = {domain: d.job(job_id) for domain, job_id in ev.children.items()}
    assert children["dirty-1"].state.value == "cancelled"
    assert all(job.terminal for job in children.values())
    for domain in GUESTS:
        where = lab.running_on(domain)
        assert len(where) == 1, f"{domain} runs on {where}"
    assert lab.running_on("dirty-1") == ["lab1"]
    assert not lab.view("lab2", "dirty-1").exists and not lab.view("lab3", "dirty-1").exists
    with pytest.raises(SubmitError, match="already cancelled"):
        d.abort(evacuation_id)


def test_a_guest_that_never_converges_is_suspended_and_the_drain_completes(
    lab: Lab,
    dirty_running: None,
    home: None,  # home's teardown first: it enables lab1 again
) -> None:
    # At 8 MiB/s dirty-1 (rewriting 64 MiB) would copy until the fleet's hard limit; the
    # evacuation's completion timeout suspends it, and it resumes on its destination.
    ev = evacuate(lab, host="lab1", to=["lab2", "lab3"], bandwidth_mib=8, completion_timeout_s=3)
    assert ev.state.value == "drained", ev.reason
    dirty = lab.drover.job(ev.children["dirty-1"])
    assert dirty.spec.completion_timeout_s == 3
    steps = [e for e in lab.drover.events(dirty.id) if e["event"] == "policy.step"]
    acted = [(e["action"], e["trigger"]) for e in steps if e["action"] != "set_downtime"]
    assert acted == [("suspend", "completion_timeout")]
    (where,) = lab.running_on("dirty-1")
    assert where != "lab1" and lab.view(where, "dirty-1").state == libvirt.VIR_DOMAIN_RUNNING
    for domain in GUESTS:
        assert not lab.view("lab1", domain).exists, f"{domain} still defined on lab1"


OFF = "off-1"  # defined, never started: moved by offline migration with --include-inactive
OLD_CPU = "oldcpu-1"  # asks for a CPU no lab hypervisor can run (TCG lacks its features)
IMPOSSIBLE_CPU = (
    "<cpu mode='custom' match='exact'><model fallback='forbid'>Icelake-Server</model></cpu>"
)


def _define_inactive(lab: Lab, name: str, cpu: str | None = None) -> None:
    xml = domain_xml(GuestSpec(name, 64))
    if cpu is not None:
        start = xml.index("<cpu")
        end = xml.index("</cpu>") + len("</cpu>")
        xml = xml[:start] + cpu + xml[end:]
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(xml)
    finally:
        conn.close()


def _undefine_everywhere(lab: Lab, name: str) -> None:
    for host in lab.hosts():
        conn = libvirt.open(lab.uri(host))
        try:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        finally:
            conn.close()


@pytest.fixture
def inactive_guests(lab: Lab) -> Iterator[None]:
    _define_inactive(lab, OFF)
    _define_inactive(lab, OLD_CPU, IMPOSSIBLE_CPU)
    yield
    for name in (OFF, OLD_CPU):
        _undefine_everywhere(lab, name)


def test_plan_from_real_facts_memory_cpu_and_inactive_domains(
    lab: Lab, home: None, limits: Path, inactive_guests: None
) -> None:
    # lab2 declares room for two idle guests (128 MiB); dirty-1 (128) and the rest go to lab3.
    block = "[hosts.lab2.limits]\nmemory_mib = 1024\n"
    assert block in limits.read_text()
    limits.write_text(limits.read_text().replace(block, "[hosts.lab2.limits]\nmemory_mib = 128\n"))
    request = {"host": "lab1", "to": ["lab2", "lab3"], "include_inactive": True}
    dry = evacuate(lab, **request, dry_run=True)
    plan = {p.domain: p for p in dry.plan or []}
    assert set(plan) == {*GUESTS, OFF, OLD_CPU}
    on_lab2 = [p for p in plan.values() if p.destination == "lab2" and p.active]
    assert sum(p.memory_mib for p in on_lab2) <= 128 and plan["dirty-1"].destination == "lab3"
    assert plan[OLD_CPU].destination is None
    assert "cannot run the guest's CPU model" in (plan[OLD_CPU].reason or "")
    assert plan[OFF].destination is not None and not plan[OFF].active

    ev = evacuate(lab, **request)
    assert ev.state.value == "partial"
    assert {p.domain: p.destination for p in ev.plan or []} == {
        d: p.destination for d, p in plan.items()
    }
    assert f"{OLD_CPU} (no destination" in (ev.reason or "")
    off_at = plan[OFF].destination
    assert off_at is not None
    moved = lab.view(off_at, OFF)
    assert moved.exists and moved.persistent and not moved.active
    assert not lab.view("lab1", OFF).exists
    # Its outcome says it is defined there, shut off (it said "running on" of it, no more).
    outcome = {o.domain: o for o in ev.outcome}
    assert (outcome[OFF].running_on, outcome[OFF].destination_state) == (off_at, "shutoff")
    dirty_at = plan["dirty-1"].destination
    assert dirty_at is not None
    assert outcome["dirty-1"].destination_state == libvirt_state(lab, dirty_at, "dirty-1")
    assert lab.view("lab1", OLD_CPU).exists  # it had nowhere to go, and is listed why
    for domain in GUESTS:
        assert lab.running_on(domain) == [plan[domain].destination], domain


def test_the_destination_asks_its_own_libvirt_about_the_cpu(
    lab: Lab, home: None, inactive_guests: None
) -> None:
    # Whatever a planner (or a producer) chose, lab2's prepare compares the guest's CPU with
    # its own hypervisor before it takes anything: facts choose, libvirt has the last word.
    job = lab.migrate(OLD_CPU, "lab1", "lab2", live=False, offline=True, persistent=True)
    assert job.state.value == "failed"
    assert "lab2 cannot run the guest's CPU model" in (job.reason or ""), job.reason
    assert "libvirt's comparison" in (job.reason or "")
    assert lab.view("lab1", OLD_CPU).exists and not lab.view("lab2", OLD_CPU).exists


def test_a_guest_another_job_moves_off_during_the_drain_counts_as_drained(
    lab: Lab, home: None, dirty_running: None
) -> None:
    """dirty-1 on its way to lab3 in a job of its own when lab1 is evacuated: the plan cannot
    take it (it has a job), and the evacuation waits for libvirt to end that migration. It
    ended `partial`, "dirty-1 not moved off lab1 (already has an active job)", while libvirt
    showed lab1 empty and dirty-1 on lab3 (probe): a domain no child took is looked for on
    every other host once libvirt shows it gone from here."""
    d = lab.drover
    other = d.submit(
        domain="dirty-1",
        src="lab1",
        dst="lab3",
        live=True,
        persistent=True,
        undefine_source=True,  # nothing of it left on lab1 once it lands
        bandwidth_mib=4,  # never converges by itself: suspended at the timeout, then lands
        completion_timeout_s=8,
    )

    def migrating() -> bool:
        return any(e["event"] == "migration.started" for e in d.events(other))

    wait_for(migrating, JOB_TIMEOUT_S, "dirty-1's own migration to start")
    try:
        ev = d.wait_evacuation(d.evacuate(d.evacuation_spec(host="lab1")), JOB_TIMEOUT_S)
        assert d.wait(other, JOB_TIMEOUT_S).state.value == "succeeded"
        judged(lab, ev)
    finally:
        d.set_host_enabled("lab1", True)  # the evacuation left it in maintenance
        if lab.running_on("dirty-1") == ["lab3"]:
            lab.set_paused("dirty-1", True)  # back as it came, its definition with it
            lab.migrate("dirty-1", "lab3", "lab1", persistent=True, undefine_source=True)


def judged(lab: Lab, ev: Evacuation) -> None:
    """The evacuation's judgement of lab1 with dirty-1 moved off by a job of its own."""
    plan = {p.domain: p for p in ev.plan or []}
    assert plan["dirty-1"].destination is None and "active job" in (plan["dirty-1"].reason or "")
    assert ev.state.value == "drained", ev.reason
    outcome = {o.domain: o for o in ev.outcome}
    assert outcome["dirty-1"].moved and outcome["dirty-1"].running_on == "lab3"
    assert outcome["dirty-1"].job_id is None and not outcome["dirty-1"].on_source
    assert lab.running_on("dirty-1") == ["lab3"]
    for domain in IDLE_GUESTS:
        assert lab.running_on(domain) != ["lab1"] and len(lab.running_on(domain)) == 1, domain


def test_a_copy_migrating_in_is_not_planned_as_the_hosts_own(lab: Lab, home: None) -> None:
    """lab1 evacuated while a job brings dirty-1 in from lab2: the planner took the incoming
    paused copy for one of lab1's guests and queued a child for it, and after that migration
    was aborted the evacuation ended `partial`, the copy "neither here nor" where it was
    planned (probe). The incoming copy is left out of the plan; with its migration aborted
    (dirty-1 back to its definition alone on lab1), lab1 is drained."""
    d = lab.drover
    lab.home("dirty-1", "lab2")
    lab.set_paused("dirty-1", False)
    try:
        incoming = d.submit(
            domain="dirty-1",
            src="lab2",
            dst="lab1",
            live=True,
            bandwidth_mib=2,
            completion_timeout_s=120,
            timeout_action="abort",
        )

        def migrating() -> bool:
            return any(e["event"] == "migration.started" for e in d.events(incoming))

        wait_for(migrating, JOB_TIMEOUT_S, "dirty-1's migration to lab1 to start")
        ev_id = d.evacuate(d.evacuation_spec(host="lab1"))
        wait_for(lambda: d.evacuations.get(ev_id).plan is not None, JOB_TIMEOUT_S, "the plan")
        planned = {p.domain for p in d.evacuations.get(ev_id).plan or []}
        assert planned == set(IDLE_GUESTS), planned
        when_free(lambda: d.abort(incoming), JOB_TIMEOUT_S)
        assert d.wait(incoming, JOB_TIMEOUT_S).state.value == "cancelled"
        ev = d.wait_evacuation(ev_id, JOB_TIMEOUT_S)
        assert ev.state.value == "drained", ev.reason
        assert lab.running_on("dirty-1") == ["lab2"]
    finally:
        d.set_host_enabled("lab1", True)
        lab.set_paused("dirty-1", True)
