"""No job lies and no job harms another (issue 11): each case checked through libvirt on every
host, by the job's final state and result, its events, and what the CLI says.

- the source definition removed mid-flight: the guest runs on the destination, so the job
  succeeds, with the leftovers in its result, and nothing is rolled back;
- a second job for a domain whose leases were removed behind drover's back: its prepare is
  refused by the destination's ledger, and its rollback leaves the first job's incoming
  guest alone;
- the destination's libvirtd restarted during perform: the rollback reconnects and says so;
- the destination's libvirtd frozen during a managed-direct perform: the job fails within the
  peer timeout instead of waiting for it for ever, the guest running on the source;
- a stalled job that resumed and succeeded is no longer shown as stalled;
- `drover abort` in post-copy says libvirt cannot abort it, and exits non-zero;
- `drover abort` of a migration a restarted worker re-attached to is carried out;
- a child migration toward a host another evacuation put in maintenance after it was planned
  is refused before perform and placed again elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from config.redis_acl import WORKER
from jobs.maintenance import Maintenance
from jobs.store import domain_lock_key
from lab import control
from tests.faults.conftest import (
    FAULT_WINDOW_S,
    assert_invariants,
    check,
    finish,
    start_throttled,
)
from tests.support.cli import run_drover
from tests.support.forgery import role_redis
from tests.support.lab_fixtures import IDLE_GUESTS, JOB_TIMEOUT_S, Lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("workers_back")]
HOME = pytest.mark.usefixtures("dirty_home")

# Slow enough that a second job reaches its prepare while the first is still copying memory
# (dirty-1 never converges at this cap; its completion timeout suspends it and ends it).
CRAWL_MIB = 8


def events_of(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    return list(lab.drover.events(job_id))


def named(lab: Lab, job_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in events_of(lab, job_id) if e["event"] == name]


def domain_id(lab: Lab, host: str, name: str) -> int | None:
    """libvirt's id of the running domain on `host` (a destroyed and restarted guest gets a
    new one), or None when it is not running there."""
    conn = libvirt.open(lab.uri(host))
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return None
        return int(dom.ID()) if dom.isActive() else None
    finally:
        conn.close()


@pytest.fixture
def source_definition(lab: Lab) -> Iterator[str]:
    """dirty-1's persistent definition on lab1, put back after a case removes it."""
    conn = libvirt.open(lab.uri("lab1"))
    try:
        xml = conn.lookupByName("dirty-1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    yield xml
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(xml)
    finally:
        conn.close()


@HOME
def test_source_undefined_mid_flight_still_succeeds(lab: Lab, source_definition: str) -> None:
    job_id = start_throttled(lab)
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.lookupByName("dirty-1").undefine()  # as `virsh undefine dirty-1` on the source
    finally:
        conn.close()
    job = finish(lab, job_id)
    check(job.state.value == "succeeded", f"job {job.state.value}: {job.reason}")
    check(lab.running_on("dirty-1") == ["lab2"], f"dirty-1 runs on {lab.running_on('dirty-1')}")
    check(not lab.view("lab1", "dirty-1").exists, "lab1 has a definition nobody made")
    leftovers = job.result.leftovers or ""
    check("no longer defined" in leftovers, f"result {job.result}")
    reported = named(lab, job_id, "confirm.leftovers")
    check(len(reported) == 1 and "no longer defined" in str(reported[0]["reason"]), f"{reported}")
    rollbacks = [e for e in events_of(lab, job_id) if e.get("phase") == "rollback"]
    check(not rollbacks, f"a rollback was sent to lab2, where the guest runs: {rollbacks}")
    # The definition is put back where it was (what the job left it as, had nobody undefined
    # it), and then everything else holds as after any successful job.
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.defineXML(source_definition)
    finally:
        conn.close()
    assert_invariants(lab, job)


@HOME
def test_a_second_job_never_destroys_the_first_jobs_incoming_guest(lab: Lab) -> None:
    first_id = start_throttled(lab, bandwidth_mib=CRAWL_MIB)
    incoming = domain_id(lab, "lab2", "dirty-1")
    check(incoming is not None, "no incoming dirty-1 on lab2 while migrating")
    uuid = lab.drover.job(first_id).source.uuid
    # The first job's leases run out under its live migration (as a keeper that stopped
    # renewing them would let happen): nothing in Redis says dirty-1 is busy any more.
    role_redis(WORKER).delete(domain_lock_key("name", "dirty-1"), domain_lock_key("uuid", uuid))
    second_id = lab.drover.submit(domain="dirty-1", src="lab1", dst="lab2", live=True)
    second = finish(lab, second_id)
    check(second.state.value == "failed", f"second job {second.state.value}: {second.reason}")
    check(
        second.reason is not None and f"for job {first_id}" in second.reason,
        f"second job failed for another reason: {second.reason}",
    )
    wait_for(lambda: bool(named(lab, second_id, "rollback.done")), JOB_TIMEOUT_S, "its rollback")
    check(not named(lab, second_id, "rollback.removed_incoming"), "it destroyed a guest")
    check(lab.drover.job(first_id).state.value == "migrating", "the first job was disturbed")
    check(domain_id(lab, "lab2", "dirty-1") == incoming, "the incoming guest was replaced")
    first = finish(lab, first_id)
    assert_invariants(lab, first)
    check(first.state.value == "succeeded", f"first job {first.state.value}: {first.reason}")
    check(domain_id(lab, "lab2", "dirty-1") == incoming, "the guest was destroyed on lab2")


@HOME
def test_destination_libvirtd_restarted_during_perform_is_rolled_back(lab: Lab) -> None:
    job_id = start_throttled(lab, bandwidth_mib=CRAWL_MIB)
    control.restart_libvirtd("lab2")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    if job.state.value == "succeeded":
        # libvirt carried the migration through the restart (never seen on the lab, where
        # QEMU's migration dies with the daemon's monitor): then no rollback may be sent.
        check(not named(lab, job_id, "rollback.done"), "a succeeded job was rolled back")
        return
    # The rollback met the connection that died with lab2's libvirtd, reconnected and
    # finished; whatever happened, the job's stream says how it ended.
    wait_for(
        lambda: bool(named(lab, job_id, "rollback.done") or named(lab, job_id, "rollback.failed")),
        JOB_TIMEOUT_S,
        "the rollback to say how it ended",
    )
    check(not named(lab, job_id, "rollback.failed"), f"{named(lab, job_id, 'rollback.failed')}")
    assert_invariants(lab, job)


# How long a frozen peer is waited for (the least `peer_timeout` allows).
PEER_TIMEOUT_S = 3


@HOME
def test_a_destination_libvirtd_frozen_mid_direct_migration_fails_the_job(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """Managed direct: the worker's own libvirt client drives both daemons, so the call that
    hands the guest over (Finish, on the destination) waits for the destination's libvirtd.
    Frozen (SIGSTOP) while memory is on the wire, that libvirtd never answers, and the job
    would stay migrating for ever, its slots held. The worker's connection to it is kept
    alive within `peer_timeout`: the call fails, libvirt resumes the guest on the source,
    and the job ends failed while lab2 is still frozen. Thawed, libvirt shows the guest
    running on lab1 only."""
    fault_config(f"[tunables]\npeer_timeout = {PEER_TIMEOUT_S}\n")
    job_id = start_throttled(lab, control="direct")
    control.freeze_libvirtd("lab2")
    try:
        job = finish(lab, job_id)
        check(job.state.value == "failed", f"job {job.state.value}: {job.reason}")
        check("migration to lab2 failed" in (job.reason or ""), f"{job.reason}")
    finally:
        control.thaw_libvirtd("lab2")
    wait_for(
        lambda: not lab.view("lab2", "dirty-1").active,
        JOB_TIMEOUT_S,
        "lab2's libvirtd to let go of the guest it never received",
    )
    assert_invariants(lab, job)


@HOME
def test_a_stalled_job_that_resumes_is_no_longer_stalled(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    fault_config("[tunables]\nstall_after = 2")
    job_id = start_throttled(lab)
    control.kill_worker("lab2")  # nobody takes finish: lab1's recovery marks the job stalled
    wait_for(
        lambda: lab.drover.job(job_id).state.value == "stalled",
        JOB_TIMEOUT_S,
        "the job to stall",
    )
    stalled = lab.drover.job(job_id)
    check(stalled.reason is not None and "lab2" in stalled.reason, f"{stalled.reason}")
    control.restart_worker("lab2")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    check(job.state.value == "succeeded", f"job {job.state.value}: {job.reason}")
    check((job.reason, job.stalled_from) == (None, None), f"{job.reason} / {job.stalled_from}")
    check(any(t.state.value == "stalled" for t in job.transitions), "the history lost the stall")
    listed = run_drover(lab.config, "jobs")
    row = next((line for line in listed.stdout.splitlines() if job_id in line), "")
    check("succeeded" in row and "not been seen" not in row, f"drover jobs shows: {row}")


@HOME
def test_abort_of_a_migration_recovery_re_attached_to(lab: Lab) -> None:
    # Peer-to-peer, at a crawl: libvirtd carries it on through the worker's death, and it
    # cannot converge before its completion timeout, so only the abort can end it early.
    job_id = start_throttled(lab, bandwidth_mib=CRAWL_MIB, completion_timeout_s=90)
    control.kill_worker("lab1")
    control.restart_worker("lab1")
    wait_for(
        lambda: bool(named(lab, job_id, "migration.reattached")),
        FAULT_WINDOW_S,
        "recovery to re-attach to the migration",
    )
    said = run_drover(lab.config, "abort", job_id)
    check(said.returncode == 0, f"abort exited {said.returncode}: {said.stderr}")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    check(job.state.value == "cancelled", f"job {job.state.value}: {job.reason}")
    check("aborted by operator" in (job.reason or ""), f"reason: {job.reason}")


@HOME
def test_abort_in_post_copy_says_libvirt_cannot(lab: Lab) -> None:
    job_id = start_throttled(lab, bandwidth_mib=CRAWL_MIB, postcopy=True)
    lab.drover.start_postcopy(job_id)
    wait_for(
        lambda: (
            lab.drover.job(job_id).postcopy_since is not None or lab.drover.job(job_id).terminal
        ),
        FAULT_WINDOW_S,
        "the switch to post-copy",
    )
    said = run_drover(lab.config, "abort", job_id)
    check(said.returncode != 0, f"abort exited {said.returncode}: {said.stdout}{said.stderr}")
    check("cannot abort a post-copy migration" in said.stderr, f"abort said: {said.stderr}")
    job = finish(lab, job_id)
    assert_invariants(lab, job)
    check(job.state.value == "succeeded", f"job {job.state.value}: {job.reason}")
    check(job.abort_requested is None, f"an abort is still pending: {job.abort_requested}")


def test_a_child_headed_for_a_host_put_in_maintenance_is_placed_again(
    lab: Lab, fault_config: Callable[[str], None]
) -> None:
    """Two evacuations a moment apart: lab1's children planned for lab2 are held at the start
    of perform while lab2's own evacuation puts it in maintenance."""
    lab.all_home()
    try:
        _two_evacuations(lab, fault_config)
    finally:
        fault_config("")
        lab.all_home()
        lab.set_paused("dirty-1", True)


def _two_evacuations(lab: Lab, fault_config: Callable[[str], None]) -> None:
    d = lab.drover
    fault_config("[faults.phase_delays]\nperform = 5")
    first = d.evacuate(d.evacuation_spec(host="lab1", to=["lab2", "lab3"], max_parallel=2))

    def toward_lab2_in_perform() -> bool:
        children = [d.job(j) for j in d.evacuation(first).children.values()]
        return any(c.spec.dst == "lab2" and "perform" in c.phases for c in children)

    wait_for(toward_lab2_in_perform, JOB_TIMEOUT_S, "a child for lab2 to reach perform")
    second = d.evacuate(d.evacuation_spec(host="lab2", to=["lab3"]))
    wait_for(
        lambda: Maintenance(d.store.r).disabled_entry("lab2") is not None,
        FAULT_WINDOW_S,
        "lab2 to go into maintenance",
    )
    ev = d.wait_evacuation(first, JOB_TIMEOUT_S)
    d.wait_evacuation(second, JOB_TIMEOUT_S)
    story = [
        {k: e.get(k) for k in ("event", "domain", "child", "dst", "was", "state", "reason")}
        for e in events_of(lab, first)
        if e["event"] != "evacuation.planned"
    ]
    check(ev.state.value == "drained", f"evacuation {ev.state.value}: {ev.reason}; {story}")
    guests = (*IDLE_GUESTS, "dirty-1")
    for domain in guests:
        where = lab.running_on(domain)
        check(where == ["lab3"], f"{domain} runs on {where}: it had to avoid lab2")
    check(ev.state.value == "drained", f"evacuation {ev.state.value}: {ev.reason}")
    replanned = named(lab, first, "evacuation.replanned")
    check(bool(replanned), "no child was placed again")
    check(all(e["was"] == "lab2" and e["dst"] == "lab3" for e in replanned), f"{replanned}")
    refused = [d.job(e["child"]) for e in named(lab, first, "evacuation.child_queued")]
    refused = [j for j in refused if j.spec.dst == "lab2"]
    check(bool(refused), "no child was ever headed for lab2")
    for job in refused:
        check(job.state.value == "failed", f"{job.id} {job.state.value}")
        check("maintenance" in (job.reason or ""), f"{job.id}: {job.reason}")
        check(not named(lab, job.id, "migration.started"), f"{job.id} migrated to lab2")
