"""Redis is not a root shell: each attack of issue 10, tried for real against the lab.

The attacker holds the Redis password (as every producer script, the Flower host and the beat
host do) but no trusted signing key. Everything here is done as they would do it: job records
written field by field, messages captured off the broker and pushed back re-headed, replayed
or onto another host's queue, Celery control broadcasts. Every outcome is read from libvirt on
the hosts, the job records and the workers' logs: nothing the attacker wrote reaches libvirt,
QEMU, qemu-img or the filesystem, and no VM moves except as a trusted producer signed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import kombu.exceptions
import libvirt
import pytest

from config.celery import host_queue, make_app, worker_node
from config.redis_acl import PRODUCER, WORKER
from jobs.abort import rollback_sender
from jobs.admission import inbound_gate
from jobs.evacuation import EvacuationSpec, EvacuationStore, Placement
from jobs.keys import (
    EVENT_FIELD,
    LANES,
    LANES_READY,
    domain_lock_key,
    events_key,
    lane_key,
    phases_key,
)
from jobs.model import Job, PhaseRecord
from jobs.phases import EVACUATE_TASK, POSTCOPY_TASK, ROLLBACK_DESTINATION_TASK, Phase, task_name
from jobs.request_signing import RequestSigner
from jobs.spec import MigrationSpec
from jobs.store import ACTIVE_JOBS, job_key
from lab import control
from lab.layout import LabLayout
from lab.proc import alive
from tests.support.controls import when_free
from tests.support.forgery import (
    ForgedJob,
    capture,
    domain_facts,
    forge_job,
    lab_signer,
    log_events,
    message_id,
    push,
    reheaded,
)
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

# dirty-1 rewrites 64 MiB of its memory over and over: at this cap even its first pass takes
# about 8 s, so a 3 s completion timeout always rings first, and under the `manual` policy its
# pre-copy goes on until something aborts it (at 32 MiB/s a starved guest converged once).
SLOW_MIB = 8

pytestmark = pytest.mark.lab

# Recovery sweeps every 5 s and re-sends a phase idle for 30 s; forged records say "long ago".
RECOVERY_S = 60.0
LOG_S = 30.0
GUEST = "idle-2"


def ended(lab: Lab, job_id: str, timeout: float = RECOVERY_S) -> Job:
    wait_for(lambda: lab.drover.job(job_id).terminal, timeout, f"job {job_id} to end")
    return lab.drover.job(job_id)


def producer_rollback(lab: Lab) -> Callable[[Job], None]:
    """What a producer's abort sends: its own signed request that a job's destination roll
    back (jobs/abort.py)."""
    return rollback_sender(lab.drover._app, lab.drover.send)


def untouched(lab: Lab, domain: str = GUEST) -> None:
    """The guest runs on lab1 as before, and no other host has any trace of it."""
    assert lab.running_on(domain) == ["lab1"]
    assert not lab.view("lab2", domain).exists and not lab.view("lab3", domain).exists


def refused_for_security(lab: Lab, job_id: str) -> Job:
    job = ended(lab, job_id)
    assert job.state.value == "failed", job
    assert job.reason is not None and job.reason.startswith("security: "), job.reason
    assert "security.rejected" in [e["event"] for e in lab.drover.events(job_id)]
    assert not job.phases or set(job.phases) <= {"source_preflight", "destination_prepare"}
    return job


def marker_script(tmp_path: Path) -> tuple[str, Path]:
    """A program that leaves a file behind if anything ever runs it (as root)."""
    marker = tmp_path / "ran-as-root"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    return f"qemu+ext:///system?command={script}", marker


@pytest.fixture
def guest_home(lab: Lab) -> Iterator[None]:
    lab.home(GUEST)
    yield
    lab.home(GUEST)


@pytest.fixture
def lab2_blocked(lab: Lab) -> Iterator[None]:
    """lab2's inbound slots held by two live-looking jobs, so a submitted job waits in line."""
    r = lab.drover.store.r
    holders = ["f0f0f0f0f0f1", "f0f0f0f0f0f2"]
    for holder in holders:
        r.hset(job_key(holder), mapping={"id": holder, "state": "migrating"})
        r.sadd(inbound_gate("lab2"), holder)
    yield
    for holder in holders:
        r.srem(inbound_gate("lab2"), holder)
        r.delete(job_key(holder))
    lab.drover.admit()


# ---- 1. a forged ext URI in the hand-off -------------------------------------------------


def prepared_with_ext_uri(
    lab: Lab, tmp_path: Path, signer: RequestSigner | None, prepared_on: str | None = None
) -> tuple[ForgedJob, Path]:
    """A job "prepared long ago" whose hand-off names a program and an outside address:
    recovery re-sends its perform. The marker file appears if the program ever runs."""
    uri, marker = marker_script(tmp_path)
    forged = forge_job(
        lab,
        MigrationSpec(domain=GUEST, src="lab1", dst="lab2"),
        state="prepared",
        facts=domain_facts(lab, "lab1", GUEST),
        handoff={"dconnuri": uri, "migrate_uri": "tcp://203.0.113.7:4444"},
        ended_phases=("source_preflight", "destination_prepare"),
        signer=signer,
        prepared_on=prepared_on,
    )
    return forged, marker


def test_an_unsigned_record_with_an_ext_uri_runs_no_command(
    lab: Lab, guest_home: None, tmp_path: Path
) -> None:
    forged, marker = prepared_with_ext_uri(lab, tmp_path, signer=None)
    refused_for_security(lab, forged.id)
    assert not marker.exists()
    untouched(lab)


def test_a_signed_job_goes_where_the_registry_says_whatever_its_handoff_says(
    lab: Lab, guest_home: None, tmp_path: Path
) -> None:
    """A request a producer really signed, and lab2's signed receipt of its prepare, its
    hand-off rewritten in Redis: recovery re-sends perform, which takes the destination URI
    and address from the registry."""
    forged, marker = prepared_with_ext_uri(lab, tmp_path, lab_signer(lab), prepared_on="lab2")
    job = ended(lab, forged.id, RECOVERY_S + JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert not marker.exists()
    assert lab.running_on(GUEST) == ["lab2"]
    started = [e for e in lab.drover.events(forged.id) if e["event"] == "migration.started"]
    peer = lab.drover.settings.host("lab2").peer_uri
    assert started and started[0]["call"]["dconnuri"] == peer, started


def test_a_job_written_prepared_is_not_migrated_without_the_destinations_receipt(
    lab: Lab, guest_home: None, tmp_path: Path
) -> None:
    """A request a producer really signed; its prepare never ran on lab2 (the message taken
    off lab2's queue, its phase written ended and the job `prepared` by hand: attacker probe).
    Recovery re-sends perform, which finds no receipt lab2 signed: the job fails, nothing
    moved (before: the guest went to lab2, which had checked and booked nothing)."""
    forged, marker = prepared_with_ext_uri(lab, tmp_path, signer=lab_signer(lab))
    job = ended(lab, forged.id, RECOVERY_S + JOB_TIMEOUT_S)
    assert job.state.value == "failed", job
    assert job.reason is not None and job.reason.startswith("security: "), job.reason
    assert "lab2 never said it prepared this job" in job.reason
    said = [e["event"] for e in lab.drover.events(forged.id)]
    assert "security.rejected" in said and "migration.started" not in said
    assert not marker.exists()
    untouched(lab)


# ---- 2. forged image paths -----------------------------------------------------------------


def test_a_rollback_never_removes_a_path_the_record_names(lab: Lab, guest_home: None) -> None:
    lab2_images = Path(lab.status["config"]).parent / "hosts/lab2/lib/images"
    lab2_images.mkdir(parents=True, exist_ok=True)
    victims = [lab2_images / "precious.qcow2", Path("/tmp") / "drover-precious-file"]
    for victim in victims:
        victim.write_text("precious")
    inside = ["/var/lib/libvirt/images/precious.qcow2", str(victims[1])]
    forged = forge_job(
        lab,
        MigrationSpec(domain=GUEST, src="lab1", dst="lab2"),
        state="failed",
        facts=domain_facts(lab, "lab1", GUEST),
        handoff={"created_images": inside},
        signer=lab_signer(lab),
    )
    try:
        producer_rollback(lab)(lab.drover.job(forged.id))  # a producer's signed rollback
        wait_for(
            lambda: any(e["event"] == "rollback.done" for e in log_events("lab2", forged.id)),
            LOG_S,
            "lab2's rollback",
        )
        assert all(v.read_text() == "precious" for v in victims)
        assert not any(
            e["event"] == "rollback.removed_images" for e in log_events("lab2", forged.id)
        )
    finally:
        for victim in victims:
            victim.unlink(missing_ok=True)
    untouched(lab)


def test_forged_disks_in_the_record_make_no_image(lab: Lab, guest_home: None) -> None:
    """The destination reads the guest's disks from the source's libvirtd, not the record:
    idle-2 has none, so nothing is made at the path the record names."""
    target = Path(lab.status["config"]).parent / "hosts/lab2/lib/images/forged.qcow2"
    target.unlink(missing_ok=True)
    facts = domain_facts(lab, "lab1", GUEST) | {
        "disks": [
            {"path": "/var/lib/libvirt/images/forged.qcow2", "format": "qcow2", "capacity": 1 << 20}
        ],
    }
    forged = forge_job(
        lab,
        MigrationSpec(domain=GUEST, src="lab1", dst="lab2", copy_storage="all"),
        state="preflight",
        facts=facts,
        ended_phases=("source_preflight",),
        signer=lab_signer(lab),
    )
    job = ended(lab, forged.id)
    assert job.state.value == "failed" and "no local disk to copy" in str(job.reason), job.reason
    assert not target.exists()
    untouched(lab)


# ---- 3. a forged waiting job ----------------------------------------------------------------


def test_a_forged_waiting_job_never_reaches_libvirt(lab: Lab, guest_home: None) -> None:
    spec = MigrationSpec(
        domain=GUEST,
        src="lab1",
        dst="lab2",
        migrate_uri="tcp://203.0.113.7:4444",
        persistent=True,
        undefine_source=True,
    )
    forged = forge_job(lab, spec, state="queued", admitted=False)
    r = lab.drover.store.r  # put in its lane by hand, as a Redis writer could
    r.zadd(lane_key("lab1", "lab2"), {forged.id: 0})
    r.sadd(LANES, lane_key("lab1", "lab2"))
    r.zadd(LANES_READY, {lane_key("lab1", "lab2"): 0})
    job = refused_for_security(lab, forged.id)
    assert not job.phases and job.admitted is None
    for host in ("lab1", "lab2"):
        assert not [e for e in log_events(host, forged.id) if e["event"] == "phase.started"]
    untouched(lab)


# ---- 4. a real job's spec changed between submission and perform ---------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"migrate_uri": "tcp://203.0.113.7:4444"},
        {"dname": "stolen"},
        {"undefine_source": True, "persistent": True},
        {"force": True, "undefine_source": True},
    ],
    ids=["migrate_uri", "dname", "undefine_source", "force"],
)
def test_a_spec_changed_in_redis_is_refused_with_the_vm_untouched(
    lab: Lab, guest_home: None, lab2_blocked: None, change: dict[str, object]
) -> None:
    job_id = lab.drover.submit(domain=GUEST, src="lab1", dst="lab2", live=True)
    assert lab.drover.job(job_id).state.value == "queued"  # waits behind the held slots
    tampered = lab.drover.job(job_id).spec.model_dump(mode="json") | change
    lab.drover.store.r.hset(job_key(job_id), "spec", MigrationSpec(**tampered).model_dump_json())
    lab.drover.store.r.srem(inbound_gate("lab2"), "f0f0f0f0f0f1")
    job = refused_for_security(lab, job_id)
    assert "spec is not what was signed" in str(job.reason)
    untouched(lab)


# ---- 5. captured messages: header swap, another host, replay, other task names -------------


def test_a_captured_message_cannot_be_reheaded_moved_or_replayed(
    lab: Lab, guest_home: None
) -> None:
    job_id = "00000000dead"  # no such job: a message that gets through only logs "no job"
    assert not lab.drover.store.r.exists(job_key(job_id))
    raw = capture(lab, task_name(Phase.SOURCE_PREFLIGHT), job_id, "lab3")

    def got_through() -> int:
        return sum(str(e.get("reason")) == f"no job {job_id}" for e in log_events("lab3", job_id))

    wait_for(lambda: got_through() == 1, LOG_S, "the captured message to run once")
    attempts = {
        "reheaded as rollback": ("lab3", reheaded(raw, ROLLBACK_DESTINATION_TASK), "delivered as"),
        "reheaded as postcopy": ("lab3", reheaded(raw, POSTCOPY_TASK), "delivered as"),
        "reheaded as celery.accumulate": (
            "lab3",
            reheaded(raw, "celery.accumulate"),
            "not a drover task",
        ),
        "onto another host's queue": (
            "lab1",
            reheaded(raw, task_name(Phase.SOURCE_PREFLIGHT)),
            "delivered to",
        ),
        "replayed as it was": ("lab3", raw, "replayed"),
    }
    for name, (host, message, reason) in attempts.items():
        push(lab, host, message)
        mid = message_id(message)

        def rejected(host: str = host, mid: str = mid) -> list[dict[str, object]]:
            return [e for e in log_events(host, mid) if e["event"] == "message.rejected"]

        wait_for(lambda: bool(rejected()), LOG_S, f"the message {name} to be rejected")
        assert reason in str(rejected()[-1]["reason"]), (name, rejected())
    assert got_through() == 1
    untouched(lab)


def test_a_signed_rollback_of_a_job_that_succeeded_changes_nothing(
    lab: Lab, guest_home: None
) -> None:
    job = lab.migrate(GUEST, "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    producer_rollback(lab)(job)  # a producer's own signed message, for a job that did not fail
    wait_for(
        lambda: any(e["event"] == "rollback.refused" for e in log_events("lab2", job.id)),
        LOG_S,
        "lab2 to refuse the rollback",
    )
    assert lab.running_on(GUEST) == ["lab2"]


def test_a_finished_job_made_to_look_interrupted_never_moves_its_guest_again(
    lab: Lab, guest_home: None
) -> None:
    """A job that succeeded, rewritten in Redis to look as if perform had never run (state
    set back, later phase records deleted, back among the active jobs): its claims used to be
    given back and perform sent again, migrating the guest a second time with no new signed
    request. The hosts' ledgers say those phases ran: nothing moves, and the source says so."""
    first = lab.migrate(GUEST, "lab1", "lab2")
    assert first.state.value == "succeeded", first.reason
    back = lab.migrate(GUEST, "lab2", "lab1")
    assert back.state.value == "succeeded", back.reason

    def migrations() -> int:
        return [e["event"] for e in lab.drover.events(first.id)].count("migration.started")

    before = migrations()
    r = lab.drover.store.r
    try:
        r.hset(job_key(first.id), mapping={"state": "prepared", "updated": "2020-01-01T00:00:00Z"})
        r.hdel(f"{job_key(first.id)}:phases", "perform", "finish", "confirm")
        r.sadd("drover:active", first.id)
        wait_for(
            lambda: "phase.not_recovered" in [e["event"] for e in lab.drover.events(first.id)],
            RECOVERY_S,
            "lab1 to refuse to send perform again",
        )
        assert lab.running_on(GUEST) == ["lab1"]
        assert lab.drover.job(first.id).state.value == "prepared"  # as forged: nothing ran
        assert migrations() == before
    finally:  # the record as it was, so that nothing waits on the forged one
        r.hset(job_key(first.id), "state", "succeeded")
        r.srem("drover:active", first.id)


def test_a_postcopy_mark_written_into_the_record_stops_neither_the_timeout_nor_the_policy(
    lab: Lab, dirty_running: None
) -> None:
    """`postcopy_since` written into a job's record before its perform: the source's monitor
    used to take it for libvirt's word (the guest already runs on the destination), stop
    judging, and the signed completion timeout never fired: a migration that cannot converge
    copied for minutes. The monitor asks libvirt: the timeout aborts it at 3 s, and the
    guest runs at home."""
    job_id = lab.drover.submit(
        domain="dirty-1",
        src="lab1",
        dst="lab2",
        live=True,
        bandwidth_mib=SLOW_MIB,  # it never converges by itself
        completion_timeout_s=3,
        timeout_action="abort",
    )
    lab.drover.store.r.hset(job_key(job_id), "postcopy_since", datetime.now(UTC).isoformat())
    job = lab.drover.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "failed", job.reason
    assert "completion timeout of 3s" in (job.reason or ""), job.reason
    assert lab.running_on("dirty-1") == ["lab1"]


# ---- 6. Celery remote control ----------------------------------------------------------------


def test_no_fleet_credential_may_send_control_and_workers_keep_their_queues(
    lab: Lab, guest_home: None
) -> None:
    """Neither the producer's nor a worker's Redis user may publish Celery control (the lab
    runs on the per-role ACL users); workers would not obey it anyway (remote control off,
    tests/unit/test_hostile_inputs.py). lab3's worker keeps running its own queue only."""
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    for role in (PRODUCER, WORKER):
        settings = lab.drover.settings.model_copy(update={"redis_url": state.url(role)})
        app = make_app(settings)
        for command, arguments in (
            ("shutdown", {}),
            ("add_consumer", {"queue": "drover.host.lab2"}),
        ):
            with pytest.raises(kombu.exceptions.OperationalError, match="no permissions"):
                app.control.broadcast(
                    command, arguments=arguments, destination=[worker_node("lab3")]
                )
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    env = {**os.environ, "DROVER_CONFIG": lab.config}
    inspect = subprocess.run(
        [celery, "-A", "config", "inspect", "ping", "--timeout", "2"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert inspect.returncode != 0, inspect.stdout
    assert alive(state.hosts["lab3"].worker_pid)
    job = lab.migrate(GUEST, "lab1", "lab3")
    assert job.state.value == "succeeded", job.reason
    job = lab.migrate(GUEST, "lab3", "lab2")
    assert job.state.value == "succeeded", job.reason
    assert job.phases["finish"].host == "lab2" and job.phases["destination_prepare"].host == "lab2"


# ---- an evacuation's plan rewritten in Redis -------------------------------------------------


def test_a_forged_evacuation_plan_moves_nothing_outside_the_signed_request(
    lab: Lab, guest_home: None
) -> None:
    """A producer signed "evacuate lab1 onto lab2"; the plan in Redis, written before the
    worker planned, sends idle-2 to lab3 as a transient guest. The worker refuses it."""
    evacuations = EvacuationStore(lab.drover.store)
    spec = EvacuationSpec(host="lab1", to=["lab2"], dry_run=False)
    ev_id = evacuations.create(spec, "producer@forger", signer=lab_signer(lab))
    facts = domain_facts(lab, "lab1", GUEST)
    evacuations.save_plan(
        ev_id,
        [
            Placement(
                domain=GUEST,
                uuid=facts["uuid"],
                memory_mib=facts["memory_mib"],
                active=True,
                persistent=facts["persistent"],
                destination="lab3",
            )
        ],
    )
    try:
        app = lab.drover._app
        lab.drover.send(app.signature(EVACUATE_TASK, args=(ev_id,), queue=host_queue("lab1")))
        ev = lab.drover.wait_evacuation(ev_id, JOB_TIMEOUT_S)
        assert ev.state.value != "drained" and ev.children == {}, ev
        (placement,) = ev.plan or []
        assert placement.destination is None and "outside --to" in str(placement.reason)
        untouched(lab)
    finally:
        lab.drover.set_host_enabled("lab1", True)


# ---- a job written "failed" while its guest is still coming in -----------------------------


def test_a_job_written_failed_mid_migration_keeps_its_incoming_copy(
    lab: Lab, dirty_running: None
) -> None:
    """`HSET drover:job:J state failed updated <an hour ago>` while dirty-1 is on its way to
    lab2: lab2's keeper took the record's word, and its rollback destroyed the incoming copy
    (with --copy-storage, its images too). libvirt on lab2 shows the migration still coming
    in: the rollback is refused while it does; the incoming copy stays as libvirt has it."""
    d, domain = lab.drover, "dirty-1"
    job_id = d.submit(
        domain=domain, src="lab1", dst="lab2", live=True, bandwidth_mib=SLOW_MIB, policy="manual"
    )
    wait_for(lambda: lab.view("lab2", domain).exists, RECOVERY_S, "the incoming copy on lab2")
    long_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    d.store.r.hset(job_key(job_id), mapping={"state": "failed", "updated": long_ago})

    # lab2's keeper takes the record's word and tries the rollback: refused while libvirt
    # shows the migration coming in, or tried again later when libvirt did not answer in
    # time (the full suite's parallel labs); either way nothing of the copy is removed.
    held_back = {"rollback.refused", "rollback.retrying"}

    def refused() -> bool:
        return any(e["event"] in held_back for e in d.events(job_id))

    try:
        wait_for(refused, JOB_TIMEOUT_S, "lab2's keeper to hold the rollback back")
    except AssertionError:  # say what the job's stream and record show, for the next look
        seen = [(e["event"], e.get("host"), e.get("reason")) for e in d.events(job_id)][-12:]
        raise AssertionError(f"{d.job(job_id).state.value}; last events: {seen}") from None
    assert not any(e["event"] == "rollback.removed_incoming" for e in d.events(job_id))
    assert lab.view("lab2", domain).exists  # still coming in, as libvirt has it
    assert lab.running_on(domain) == ["lab1", "lab2"]  # running there, paused-incoming here
    # The operator's abort, made in libvirt (the record says failed): libvirt cleans lab2 up.
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.lookupByName(domain).abortJob()
    finally:
        conn.close()

    def gone_from_lab2() -> bool:
        lab2 = libvirt.open(lab.uri("lab2"))
        try:
            lab2.lookupByName(domain)
        except libvirt.libvirtError:
            return True  # no such domain (it may vanish between two calls: one call only)
        finally:
            lab2.close()
        return False

    wait_for(gone_from_lab2, RECOVERY_S, "lab2's copy to go")
    assert lab.running_on(domain) == ["lab1"]


# ---- an operator's cancel written back in Redis --------------------------------------------


def test_a_cancelled_job_written_back_to_queued_never_runs(lab: Lab, guest_home: None) -> None:
    """Probe, with the producer's password: a job cancelled while queued (its source's
    worker away) was written back to `queued` in its lane; admission started it again and
    the guest moved against the operator's cancel (its signed request good for a day). Each
    host keeps the cancel from the signed notice the abort sends: nothing runs, the record
    is set back to `cancelled`, and the guest stays."""
    control.kill_worker("lab1")
    try:
        job_id = lab.drover.submit(domain=GUEST, src="lab1", dst="lab2", live=True)
        assert lab.drover.job(job_id).state.value == "queued"  # lab1's worker is away
        assert "cancelled (queued)" in lab.drover.abort(job_id)
    finally:
        control.restart_worker("lab1")
        lab.status = control.status()

    r = lab.drover.store.r
    r.hset(job_key(job_id), "state", "queued")
    r.hdel(job_key(job_id), "reason", "abort_requested")
    r.sadd(ACTIVE_JOBS, job_id)
    r.zadd(lane_key("lab1", "lab2"), {job_id: 0})
    r.sadd(LANES, lane_key("lab1", "lab2"))
    r.zadd(LANES_READY, {lane_key("lab1", "lab2"): 0})

    # lab1's worker, back, takes the notice first (its queue holds it before anything
    # admission sends now), lab2's took it at once.
    wait_for(lambda: lab.drover.job(job_id).state.value != "queued", RECOVERY_S, "admission")
    job = ended(lab, job_id)
    assert job.state.value == "cancelled", job
    assert "was cancelled by" in (job.reason or ""), job.reason
    said = list(lab.drover.events(job_id))
    assert {e["host"] for e in said if e["event"] == "cancel.noted"} == {"lab1", "lab2"}
    assert "security.rejected" in [e["event"] for e in said]
    for host in ("lab1", "lab2"):
        assert not [e for e in log_events(host, job_id) if e["event"] == "phase.started"]
    untouched(lab)


# ---- a job's event stream run out of IDs -----------------------------------------------------

MAX_STREAM_ID = "18446744073709551615-18446744073709551615"


def test_a_stream_run_out_of_ids_mid_migration_still_tells_the_whole_story(
    lab: Lab, guest_home: None
) -> None:
    """`XADD drover:job:J:events 18446744073709551615-18446744073709551615 ...` while idle-2
    migrates: no ID was left for the next event, and every later one (the migration's
    completion, the job's end) was refused and lost while libvirt moved the guest. The worker
    gives the stream its IDs back, says so, and the story goes on to its end."""
    d = lab.drover
    job_id = d.submit(domain=GUEST, src="lab1", dst="lab2", live=True, bandwidth_mib=SLOW_MIB)

    def started() -> bool:
        return any(e["event"] == "migration.started" for e in d.events(job_id))

    wait_for(started, JOB_TIMEOUT_S, "the migration to start")
    forged = {"event": "job.state", "state": "failed", "job_id": job_id}
    d.store.r.xadd(events_key(job_id), {EVENT_FIELD: json.dumps(forged)}, id=MAX_STREAM_ID)
    job = d.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(GUEST) == ["lab2"]
    names = [e["event"] for e in d.events(job_id)]
    assert "events.ids_reclaimed" in names, " ".join(names)
    after = names[names.index("events.ids_reclaimed") :]
    assert "migration.completed" in after or "phase.finished" in after
    last = list(d.events(job_id))[-1]
    assert (last["event"], last["state"]) == ("job.state", "succeeded")
    assert not any(e.get("state") == "failed" for e in d.events(job_id))  # the forgery went


# ---- a second job for a guest whose Redis lease was deleted -----------------------------------


def test_a_second_job_for_a_guest_on_its_way_out_never_takes_the_first_ones_migration(
    lab: Lab, dirty_running: None
) -> None:
    """`DEL drover:lock:name:dirty-1 drover:lock:uuid:U` while job A sends dirty-1 to lab2,
    then job B for dirty-1 to lab3 with a 3 s completion timeout: libvirt refused B's call,
    and B's perform followed A's migration as its own, its timeout aborting A (probe). Now
    lab1's ledger says A sends dirty-1: B fails before its call, A goes on untouched."""
    d, domain = lab.drover, "dirty-1"
    a = d.submit(
        domain=domain, src="lab1", dst="lab2", live=True, bandwidth_mib=SLOW_MIB, policy="manual"
    )

    def migrating() -> bool:
        return any(e["event"] == "migration.started" for e in d.events(a))

    wait_for(migrating, JOB_TIMEOUT_S, "job A's migration to start")
    conn = libvirt.open(lab.uri("lab1"))
    try:
        uuid = conn.lookupByName(domain).UUIDString()
    finally:
        conn.close()
    d.store.r.delete(domain_lock_key("name", domain), domain_lock_key("uuid", uuid))
    b = d.submit(
        domain=domain,
        src="lab1",
        dst="lab3",
        live=True,
        completion_timeout_s=3,
        timeout_action="abort",
    )
    job_b = d.wait(b, timeout=JOB_TIMEOUT_S)
    assert job_b.state.value == "failed", job_b.reason
    assert f"in job {a} (this host's ledger); nothing moved" in (job_b.reason or ""), job_b.reason
    assert not any(e["event"] == "migration.started" for e in d.events(b))
    assert not lab.view("lab3", domain).exists
    job_a = d.job(a)
    assert job_a.state.value == "migrating", job_a.reason
    assert not any(e.get("action") == "abort" for e in d.events(a))
    when_free(lambda: d.abort(a), JOB_TIMEOUT_S)  # the operator's own abort: dirty-1 stays
    assert d.wait(a, timeout=JOB_TIMEOUT_S).state.value == "cancelled"
    wait_for(lambda: lab.running_on(domain) == ["lab1"], RECOVERY_S, "dirty-1 on lab1 only")


# ---- a failed job written back to migrating after another job moved its guest ----------------


def test_a_failed_job_written_live_never_claims_a_move_another_job_made(
    lab: Lab, dirty_running: None
) -> None:
    """Job F's migration of dirty-1 to lab2 fails (its completion timeout) and is rolled back;
    job G then moves dirty-1 there. `HSET drover:job:F state migrating` and `SADD
    drover:active F`: lab2's recovery sent F's finish again, which verified the guest G had
    brought in, and F "succeeded" (probe). lab2's ledger says F's incoming guest was given up
    there: nothing is sent, and F never claims G's move."""
    d, domain = lab.drover, "dirty-1"
    f = d.submit(
        domain=domain,
        src="lab1",
        dst="lab2",
        live=True,
        bandwidth_mib=SLOW_MIB,  # the 3 s timeout comes first
        completion_timeout_s=3,
        timeout_action="abort",
    )
    assert d.wait(f, timeout=JOB_TIMEOUT_S).state.value == "failed"
    rolled_back = lambda: any(e["event"] == "rollback.done" for e in d.events(f))  # noqa: E731
    wait_for(rolled_back, RECOVERY_S, "F's rollback on lab2")
    lab.set_paused(domain, True)  # G's move: a paused guest converges at once
    g = d.wait(d.submit(domain=domain, src="lab1", dst="lab2", live=True), timeout=JOB_TIMEOUT_S)
    assert g.state.value == "succeeded", g.reason
    assert lab.running_on(domain) == ["lab2"]

    d.store.r.hset(job_key(f), "state", "migrating")
    d.store.r.sadd(ACTIVE_JOBS, f)
    try:
        not_recovered = lambda: any(  # noqa: E731
            e["event"] == "phase.not_recovered" and e.get("phase") == "finish" for e in d.events(f)
        )
        wait_for(not_recovered, RECOVERY_S, "lab2's recovery to say F's finish cannot run")
        job = d.job(f)
        assert job.state.value != "succeeded" and "finish" not in job.phases, job
        assert not any(e["event"] in ("phase.redispatched", "finish.verified") for e in d.events(f))
        # And F's finish written ended too: its confirm is due on lab1, whose ledger says
        # F's migration failed there with the guest still home.
        ended = datetime.now(UTC)
        finish = PhaseRecord(phase="finish", host="lab2", started=ended, ended=ended)
        d.store.r.hset(phases_key(f), "finish", finish.model_dump_json())
        confirm_refused = lambda: any(  # noqa: E731
            e["event"] == "phase.not_recovered" and e.get("phase") == "confirm" for e in d.events(f)
        )
        wait_for(confirm_refused, RECOVERY_S, "lab1's recovery to say F's confirm cannot run")
        job = d.job(f)
        assert job.state.value != "succeeded" and "confirm" not in job.phases, job
        assert not any(e["event"] == "confirm.verified" for e in d.events(f))
        assert lab.running_on(domain) == ["lab2"]
    finally:
        d.store.r.hset(job_key(f), "state", "failed")
        d.store.r.srem(ACTIVE_JOBS, f)


# ---- a gate filled with slots of jobs that do not exist ---------------------------------------


def test_a_gate_filled_with_forged_holders_holds_no_real_job_back(
    lab: Lab, guest_home: None
) -> None:
    """`SADD drover:slots:in:lab3 fakeA fakeB` beside records written `migrating`: every job
    toward lab3 stayed `queued` for as long as they stayed (probe: over two minutes). A
    worker's safety pass takes those slots back (no trusted key signed their records), and
    the job moves idle-2 to lab3."""
    d = lab.drover
    fakes = ("f0f0f0f0f0f1", "f0f0f0f0f0f2")  # max_inbound 2 in the lab's registry
    for fake in fakes:
        d.store.r.hset(job_key(fake), mapping={"id": fake, "state": "migrating"})
        d.store.r.sadd(inbound_gate("lab3"), fake)
    try:
        job = d.wait(d.submit(domain=GUEST, src="lab1", dst="lab3", live=True), JOB_TIMEOUT_S)
        assert job.state.value == "succeeded", job.reason
        assert lab.running_on(GUEST) == ["lab3"]
        assert not set(fakes) & set(d.store.r.smembers(inbound_gate("lab3")))
    finally:
        d.store.r.srem(inbound_gate("lab3"), *fakes)
        d.store.r.delete(*(job_key(fake) for fake in fakes))
