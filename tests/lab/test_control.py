"""`drover tune` and `drover force-complete` on a running migration of dirty-1, and the
downtime every successful job reports, checked through libvirt on both hosts.

dirty-1 stays in pre-copy under `policy="manual"` (no action of its own) and a small
bandwidth cap until the operator acts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from jobs.errors import SubmitError
from jobs.keys import ABORT_FIELD, tune_key
from jobs.model import Job
from jobs.store import job_key
from lab import control
from tests.support.cli import run_drover
from tests.support.controls import when_free
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.lab

DIRTY = "dirty-1"
START_TIMEOUT_S = 60.0
SLOW_MIB = 8  # far below dirty-1's dirty rate: pre-copy never ends on its own
MIB = 1024 * 1024
EVENT_SLACK_MS = 200  # libvirt's events reach the worker a little after they happen
TUNE_SENT_S = 30.0  # a `drover tune` process starts and puts its request in Redis
TUNE_ANSWER_S = 60.0  # ... and hears back: within its control_reply_timeout and waits


class Started:
    """The jobs a test started, aborted at teardown if a failure left one running."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ids: list[str] = []

    def migrating(self, **opts: Any) -> str:
        """Submit dirty-1 lab1 -> lab2 and return once libvirt on lab1 transfers its memory.

        An active migration job alone is not enough: libvirt shows it from the start of its
        own setup, and applies the migration's parameters (its bandwidth) only once the
        destination is prepared, about 0.3 s later on the lab (longer under load); until then
        `migrateGetMaxSpeed` reads unlimited. QEMU's memory figures appear only after."""
        job_id = self.lab.drover.submit(domain=DIRTY, src="lab1", dst="lab2", live=True, **opts)
        self.ids.append(job_id)
        wait_for(
            lambda: (
                self.lab.drover.job(job_id).state.value == "migrating"
                and (outgoing_stats(self.lab) or {}).get("memory_total", 0) > 0
            ),
            START_TIMEOUT_S,
            f"job {job_id} migrating in libvirt",
        )
        return job_id


def outgoing_stats(lab: Lab) -> dict[str, Any] | None:
    """libvirt's statistics of dirty-1's migration on lab1 (None: no migration job)."""
    conn = libvirt.open(lab.uri("lab1"))
    try:
        stats: dict[str, Any] = conn.lookupByName(DIRTY).jobStats()
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()
    return None if stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE else stats


def on_source(lab: Lab, fn: Any) -> Any:
    conn = libvirt.open(lab.uri("lab1"))
    try:
        return fn(conn.lookupByName(DIRTY))
    finally:
        conn.close()


@pytest.fixture
def started(lab: Lab, dirty_running: None) -> Iterator[Started]:
    s = Started(lab)
    yield s
    for job_id in s.ids:
        if not lab.drover.job(job_id).terminal:
            lab.drover.abort(job_id)
            lab.drover.wait(job_id, JOB_TIMEOUT_S)
    if lab.running_on(DIRTY) == ["lab2"]:  # home while it runs: auto-converge lands it
        home = lab.migrate(DIRTY, "lab2", "lab1", auto_converge=True, bandwidth_mib=128)
        assert home.state.value == "succeeded", home.reason


def operator_steps(lab: Lab, job_id: str) -> list[dict[str, Any]]:
    return [
        ev
        for ev in lab.drover.events(job_id)
        if ev["event"] == "policy.step" and ev.get("by") == "operator"
    ]


def landed_on_lab2(lab: Lab, job: Job) -> None:
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on(DIRTY) == ["lab2"]
    assert lab.view("lab2", DIRTY).state == libvirt.VIR_DOMAIN_RUNNING
    completed = [ev for ev in lab.drover.events(job.id) if ev["event"] == "migration.completed"]
    assert len(completed) == 1 and completed[0]["mode"] == job.result.mode
    assert job.result.downtime_ms is not None and job.result.downtime_ms >= 0
    assert completed[0]["downtime_ms"] == job.result.downtime_ms


def test_tune_takes_effect_in_libvirt_and_force_complete_suspends_without_postcopy(
    lab: Lab, started: Started
) -> None:
    job_id = started.migrating(policy="manual", bandwidth_mib=SLOW_MIB)
    postcopy_flag = libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY

    # manual forbids post-copy: a post-copy bandwidth would never be used, and the whole
    # request is refused in one line, nothing of it applied (b8ba75d, and the worker: 9e499c1).
    refused = run_drover(
        lab.config, "tune", job_id, "--bandwidth", "64", "--max-downtime", "700",
        "--postcopy-bandwidth", "5",
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "does not allow post-copy" in refused.stderr
    assert on_source(lab, lambda d: d.migrateGetMaxSpeed(0)) == SLOW_MIB
    assert operator_steps(lab, job_id) == []

    done = when_free(
        lambda: run_drover(
            lab.config, "tune", job_id, "--bandwidth", "64", "--max-downtime", "700"
        ),
        TUNE_ANSWER_S,
    )
    assert done.returncode == 0, done.stderr
    assert "bandwidth_mib=64" in done.stdout and "max_downtime_ms=700" in done.stdout
    assert on_source(lab, lambda d: d.migrateGetMaxSpeed(0)) == 64
    assert on_source(lab, lambda d: d.migrateGetMaxSpeed(postcopy_flag)) != 5
    assert on_source(lab, lambda d: d.migrateGetMaxDowntime(0)) == 700
    [step] = operator_steps(lab, job_id)
    assert step["action"] == "tune" and step["bandwidth_mib"] == 64
    assert step["max_downtime_ms"] == 700 and step.get("postcopy_bandwidth_mib") is None

    # manual forbids post-copy: force-complete pauses the guest; it runs again on arrival.
    line = when_free(lambda: lab.drover.force_complete(job_id), TUNE_ANSWER_S)
    assert "suspend" in line and "forbids post-copy" in line
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    landed_on_lab2(lab, job)
    assert job.result.mode == "precopy"
    assert [s["action"] for s in operator_steps(lab, job_id)] == ["tune", "suspend"]

    # A finished job is not migrating: refused with the reason, nothing sent.
    for act in (
        lambda: lab.drover.tune(job_id, bandwidth_mib=9),
        lambda: lab.drover.force_complete(job_id),
    ):
        with pytest.raises(SubmitError, match=f"job {job_id} is succeeded, not migrating"):
            act()
    refused = run_drover(lab.config, "force-complete", job_id)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "is succeeded, not migrating" in refused.stderr


def forged(raw: str) -> str:
    """A tune request with the attacker's numbers and name: in the signed payload (its
    signature left as it was), or in plain JSON as producers wrote it before signing."""
    attacker = {"bandwidth_mib": 1_000_000, "max_downtime_ms": 60_000, "by": "alice@ops"}
    request = json.loads(raw)
    if "payload" not in request:
        return json.dumps(request | attacker)
    payload = json.loads(request["payload"])
    payload["spec"].update(attacker)
    request["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return json.dumps(request)


def test_a_tune_changed_in_redis_before_the_worker_takes_it_is_refused(
    lab: Lab, started: Started
) -> None:
    """Attacker probe, with the producer's Redis password: the numbers beside an operator's
    `drover tune --bandwidth 2` were rewritten before the source worker took them, and
    libvirt ran the migration uncapped with a 60 s pause allowed, "asked by alice@ops". The
    request is signed now: the changed one is refused in one line and libvirt keeps its
    limits; the operator's own request, unchanged, is applied."""
    job_id = started.migrating(policy="manual", bandwidth_mib=SLOW_MIB)
    downtime = on_source(lab, lambda d: d.migrateGetMaxDowntime(0))
    key = tune_key(job_id)
    answers: list[subprocess.CompletedProcess[str]] = []
    control.freeze_worker("lab1")  # the request waits in lab1's queue, its numbers in Redis
    try:
        asking = threading.Thread(
            target=lambda: answers.append(
                run_drover(lab.config, "tune", job_id, "--bandwidth", "2")
            )
        )
        asking.start()
        wait_for(lambda: lab.drover.store.r.hlen(key) == 1, TUNE_SENT_S, "the tune request")
        [(request_id, raw)] = lab.drover.store.r.hgetall(key).items()
        lab.drover.store.r.hset(key, request_id, forged(raw))
    finally:
        control.thaw_worker("lab1")
    asking.join(TUNE_ANSWER_S)
    [refused] = answers
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "tune refused by lab1" in refused.stderr and "does not verify" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert on_source(lab, lambda d: d.migrateGetMaxSpeed(0)) == SLOW_MIB
    assert on_source(lab, lambda d: d.migrateGetMaxDowntime(0)) == downtime
    assert operator_steps(lab, job_id) == []

    done = when_free(
        lambda: run_drover(lab.config, "tune", job_id, "--bandwidth", "2"), TUNE_ANSWER_S
    )
    assert done.returncode == 0 and "bandwidth_mib=2" in done.stdout, done.stderr
    assert on_source(lab, lambda d: d.migrateGetMaxSpeed(0)) == 2
    [step] = operator_steps(lab, job_id)
    assert step["bandwidth_mib"] == 2 and "alice" not in step["reason"]


def test_force_complete_switches_to_postcopy_where_allowed(lab: Lab, started: Started) -> None:
    # A 1 MiB/s post-copy cap holds post-copy open until the operator lifts it.
    job_id = started.migrating(
        policy="manual", postcopy=True, bandwidth_mib=SLOW_MIB, postcopy_bandwidth_mib=1
    )
    line = when_free(lambda: lab.drover.force_complete(job_id), TUNE_ANSWER_S)
    assert "post-copy" in line
    wait_for(
        lambda: lab.view("lab1", DIRTY).state == libvirt.VIR_DOMAIN_PAUSED,
        START_TIMEOUT_S,
        "the source paused for post-copy",
    )
    # In post-copy already: the source worker refuses, after asking libvirt.
    with pytest.raises(SubmitError, match=r"refused by lab1: .* already in post-copy"):
        lab.drover.force_complete(job_id)
    assert lab.drover.job(job_id).state.value == "migrating"

    assert "postcopy_bandwidth_mib=0" in when_free(
        lambda: lab.drover.tune(job_id, postcopy_bandwidth_mib=0), TUNE_ANSWER_S
    )
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    landed_on_lab2(lab, job)
    assert job.result.mode == "postcopy" and job.postcopy_since is not None
    # The switch's own stop is no pause before it (a probe saw 5-34 ms reported so).
    assert job.result.paused_before_switch_ms is None, job.result.downtime_ms
    steps = operator_steps(lab, job_id)
    assert [s["action"] for s in steps] == ["postcopy", "tune"]
    assert steps[0]["data_remaining"] > 0 and "memory_iteration" in steps[0]
    refusals = [ev for ev in lab.drover.events(job_id) if ev["event"] == "control.refused"]
    assert len(refusals) == 1 and "already in post-copy" in refusals[0]["reason"]


def test_a_switch_asked_after_an_accepted_abort_does_not_land_the_guest(
    lab: Lab, started: Started
) -> None:
    """A probe ran `drover abort` and, 0.1 s later, `drover postcopy`: the abort was accepted,
    the switch made, libvirt refused the abort in post-copy and dirty-1 landed on lab2 (the
    job succeeded). The switch is now refused while an abort is pending, and the abort is
    carried out: the guest stays on lab1, running."""
    job_id = started.migrating(policy="manual", postcopy=True, bandwidth_mib=SLOW_MIB)
    aborted = run_drover(lab.config, "abort", job_id)
    assert aborted.returncode == 0 and "abort requested" in aborted.stdout, aborted.stderr
    # The worker refuses the switch, and the command says so (it said "post-copy requested"
    # and exit 0): an abort is pending, or, carried out first, there is nothing to switch.
    switched = run_drover(lab.config, "postcopy", job_id)
    assert switched.returncode == 2 and "Traceback" not in switched.stderr, switched.stderr
    assert "post-copy refused by lab1" in switched.stderr or "not migrating" in switched.stderr
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on(DIRTY) == ["lab1"]
    assert lab.view("lab1", DIRTY).state == libvirt.VIR_DOMAIN_RUNNING
    events = lab.drover.events(job_id)
    names = [ev["event"] for ev in events]
    assert "migration.postcopy_started" not in names and "migration.abort_refused" not in names
    assert job.postcopy_since is None
    if "refused" in switched.stderr:  # said in the job's stream too
        assert "control.refused" in names, (switched.stderr, names)


def test_an_abort_whose_flag_is_deleted_in_redis_still_stops_the_migration(
    lab: Lab, started: Started
) -> None:
    """Attacker probe, with the producer's Redis password: the abort flag of a running
    migration, deleted as soon as `drover abort` set it. The operator was told the migration
    would be aborted, and it went on. The source's worker is told by a signed notice it keeps:
    the migration is aborted in libvirt, the job ends `cancelled`, the guest runs on lab1."""
    job_id = started.migrating(policy="manual", bandwidth_mib=SLOW_MIB)
    control.freeze_worker("lab1")  # the notice waits in lab1's queue, the flag in Redis
    try:
        said = lab.drover.abort(job_id)
        assert lab.drover.store.r.hdel(job_key(job_id), ABORT_FIELD) == 1
    finally:
        control.thaw_worker("lab1")
    assert said.startswith("abort requested: lab1 aborts"), said
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on(DIRTY) == ["lab1"]
    assert lab.view("lab1", DIRTY).state == libvirt.VIR_DOMAIN_RUNNING
    assert not lab.view("lab2", DIRTY).exists
    assert outgoing_stats(lab) is None  # libvirt on lab1 runs no migration job
    names = [(ev["event"], ev.get("host")) for ev in lab.drover.events(job_id)]
    assert ("abort.noted", "lab1") in names, names


def test_an_abort_flag_written_in_redis_stops_no_migration(lab: Lab, started: Started) -> None:
    """Attacker, with the producer's Redis password: `HSET drover:job:J abort_requested
    "aborted by operator"` on a running migration made lab1's monitor abort it in libvirt,
    no operator asking. No trusted key signed that flag: lab1 says so once and the migration
    goes on (libvirt still transfers); the operator's own abort then stops it."""
    job_id = started.migrating(policy="manual", bandwidth_mib=SLOW_MIB)
    lab.drover.store.r.hset(job_key(job_id), ABORT_FIELD, "aborted by operator")

    def rejected() -> list[dict[str, Any]]:
        return [ev for ev in lab.drover.events(job_id) if ev["event"] == "security.rejected"]

    wait_for(lambda: bool(rejected()), START_TIMEOUT_S, "lab1 to pass over the unsigned flag")
    (said,) = rejected()
    assert said["host"] == "lab1" and "abort flag is not acted on" in said["reason"], said
    sent = (outgoing_stats(lab) or {}).get("memory_processed", 0)
    wait_for(  # libvirt goes on sending: the monitor looked again, and aborted nothing
        lambda: (outgoing_stats(lab) or {}).get("memory_processed", 0) > sent + SLOW_MIB * MIB,
        START_TIMEOUT_S,
        "libvirt on lab1 to go on transferring dirty-1",
    )
    assert lab.drover.job(job_id).state.value == "migrating"
    assert len(rejected()) == 1  # said once, not at every look

    assert lab.drover.abort(job_id).startswith("abort requested: lab1 aborts")
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on(DIRTY) == ["lab1"]
    assert not lab.view("lab2", DIRTY).exists
    assert outgoing_stats(lab) is None


def test_an_abort_refused_on_a_forged_postcopy_mark_still_stops_the_migration(
    lab: Lab, started: Started
) -> None:
    """Attacker probe, with the producer's Redis password: a pre-copy migration's record
    written as in post-copy made `drover abort` say libvirt could not abort it, and the guest
    moved. The refusal now says it is the record's word, the source is told all the same,
    and its worker, whose look at libvirt shows pre-copy, aborts the migration."""
    job_id = started.migrating(policy="manual", bandwidth_mib=SLOW_MIB)
    lab.drover.store.r.hset(job_key(job_id), "postcopy_since", "2026-12-05T07:00:00+00:00")
    with pytest.raises(SubmitError, match="the job record's word: lab1 was told all the same"):
        lab.drover.abort(job_id)
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "cancelled", job.reason
    assert lab.running_on(DIRTY) == ["lab1"]
    assert lab.view("lab1", DIRTY).state == libvirt.VIR_DOMAIN_RUNNING
    assert not lab.view("lab2", DIRTY).exists
    assert outgoing_stats(lab) is None


def test_a_pause_before_the_switch_to_postcopy_counts_in_the_downtime(
    lab: Lab, started: Started
) -> None:
    """Probe F4: a guest paused while it migrated, then switched to post-copy, was reported
    down for libvirt's post-copy downtime only (6 ms; libvirt counts from the switch), though
    it had been paused for seconds. The pause now counts, from libvirt's own events."""
    job_id = started.migrating(policy="manual", postcopy=True, bandwidth_mib=SLOW_MIB)
    conn = libvirt.open(lab.uri("lab1"))
    try:
        conn.lookupByName(DIRTY).suspend()
    finally:
        conn.close()
    paused = time.monotonic()

    def reports() -> int:
        return sum(ev["event"] == "migration.progress" for ev in lab.drover.events(job_id))

    # Paused for a while, and seen so by drover: two more reports of the paused migration.
    seen = reports()
    wait_for(lambda: reports() >= seen + 2, START_TIMEOUT_S, "two reports after the pause")
    asked = time.monotonic()
    switched = run_drover(lab.config, "postcopy", job_id)
    said = f"job {job_id}: switched to post-copy (drover postcopy)"
    assert switched.returncode == 0 and said in switched.stdout, switched.stderr
    job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    landed_on_lab2(lab, job)
    shown = job.result.model_dump(exclude={"source_checks", "destination_checks", "final"})
    assert job.result.mode == "postcopy", shown
    before_switch = job.result.paused_before_switch_ms
    # libvirt's events are stamped as they reach the worker: a little slack for delivery.
    least_ms = (asked - paused) * 1000 - EVENT_SLACK_MS
    assert before_switch is not None and before_switch >= least_ms, shown
    assert job.result.downtime_ms is not None and job.result.downtime_ms > before_switch
    [completed] = [ev for ev in lab.drover.events(job_id) if ev["event"] == "migration.completed"]
    assert completed["downtime_ms"] == job.result.downtime_ms
    assert completed["paused_before_switch_ms"] == before_switch


def test_every_successful_job_reports_its_downtime(lab: Lab) -> None:
    lab.home("idle-1")
    job = lab.migrate("idle-1", "lab1", "lab2")
    assert job.state.value == "succeeded", job.reason
    assert lab.running_on("idle-1") == ["lab2"]
    assert job.result.downtime_ms is not None and job.result.mode == "precopy"
    assert job.result.final is not None and (job.result.final.data_total or 0) > 0
    [completed] = [ev for ev in lab.drover.events(job.id) if ev["event"] == "migration.completed"]
    assert completed["downtime_ms"] == job.result.downtime_ms
    assert completed["figures_from"] == "job-completed event"
    jobs = run_drover(lab.config, "jobs", "--limit", "1")
    assert jobs.returncode == 0 and f"{job.result.downtime_ms} ms" in jobs.stdout
    lab.home("idle-1")
