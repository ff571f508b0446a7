"""`drover tune` / `force-complete` refusals before anything reaches a worker, the tune
request's round trip through Redis, and libvirt's completed statistics read into a job's
result (worker/completion.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from config.celery import host_queue
from config.settings import load_settings
from jobs.control import BadControlRequest, TuneRequest, pop_tune, push_tune, tune_request
from jobs.errors import SubmitError
from jobs.keys import tune_key
from jobs.phases import POSTCOPY_TASK
from jobs.prepared_receipt import sign_prepared
from jobs.record import Result, merged_field
from jobs.request_signing import signer_for, verifier_for
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from producer.control import ControlRequests
from producer.render import downtime_cell, event_line, jobs_table
from tests.support.cli import run_drover
from tests.support.registry import REGISTRY, make_fleet_keys, signing_section
from worker.completion import Landing, parse_completed

# A pre-copy migration's completed statistics, as libvirt's job-completed event gives them.
PRECOPY_STATS = {
    "type": 3,
    "operation": 3,
    "time_elapsed": 2310,
    "downtime": 27,
    "setup_time": 4,
    "data_total": 139_000_000,
    "data_processed": 412_000_000,
    "data_remaining": 0,
    "memory_total": 139_000_000,
    "memory_processed": 412_000_000,
    "memory_bps": 66_000_000,
    "memory_dirty_rate": 0,
    "memory_iteration": 7,
    "memory_postcopy_requests": 0,
    "disk_total": 0,
    "disk_processed": 0,
    "auto_converge_throttle": 0,
}


def test_precopy_statistics_give_downtime_mode_and_figures() -> None:
    landed = parse_completed(PRECOPY_STATS, "job-completed event", switched=False)
    assert landed.downtime_ms == 27 and landed.mode == "precopy"
    assert landed.final is not None
    assert landed.final.time_elapsed_ms == 2310 and landed.final.memory_iteration == 7
    assert landed.final.data_total == 139_000_000 and landed.final.data_processed == 412_000_000
    event = landed.event_fields()
    assert event["downtime_ms"] == 27 and event["mode"] == "precopy"
    assert event["figures_from"] == "job-completed event" and event["memory_iteration"] == 7


def test_postcopy_is_told_by_the_switch_or_by_pages_the_destination_faulted_in() -> None:
    assert parse_completed(PRECOPY_STATS, "job-completed event", switched=True).mode == "postcopy"
    faulted = PRECOPY_STATS | {"memory_postcopy_requests": 12}
    assert parse_completed(faulted, "job-completed event", switched=False).mode == "postcopy"


def test_missing_and_odd_values_are_left_out_not_guessed() -> None:
    landed = parse_completed(
        {"type": 3, "downtime": "soon", "memory_iteration": True}, "destination", False
    )
    assert landed.downtime_ms is None
    assert landed.final is not None and landed.final.memory_iteration is None
    assert "downtime_ms" not in landed.result_fields()
    assert Landing().result_fields() == {}


def test_the_result_record_keeps_the_figures_typed() -> None:
    landed = parse_completed(PRECOPY_STATS, "job-completed event", switched=False)
    raw = merged_field(
        "0123456789ab", "result", None, {"migration_ms": 2400.0} | landed.result_fields()
    )
    result = Result.model_validate_json(raw)
    assert result.downtime_ms == 27 and result.mode == "precopy"
    assert result.final is not None and result.final.memory_iteration == 7
    assert result.figures_from == "job-completed event"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "give at least one of --bandwidth, --postcopy-bandwidth, --max-downtime"),
        ({"bandwidth_mib": -1}, "--bandwidth -1: Input should be greater than or equal to 0"),
        ({"bandwidth_mib": 10**7}, "--bandwidth 10000000: Input should be less than or equal"),
        ({"max_downtime_ms": 0}, "--max-downtime 0: Input should be greater than or equal to 1"),
        ({"max_downtime_ms": 60_001}, "--max-downtime 60001: Input should be less than or equal"),
        ({"postcopy_bandwidth_mib": -5}, "--postcopy-bandwidth -5: Input should be greater"),
    ],
)
def test_bad_tune_numbers_are_one_line(values: dict[str, int], message: str) -> None:
    with pytest.raises(BadControlRequest) as exc:
        tune_request(**values)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_each_tune_task_takes_its_own_request_checked_again(store: JobStore) -> None:
    """Concurrent tunes: each task gets the request sent with it, whatever the order the
    tasks run in (taken oldest first, one caller was told of another's figures)."""
    job_id = "0123456789ab"
    push_tune(store.r, job_id, "task-a", tune_request(bandwidth_mib=8), ttl_s=60)
    push_tune(store.r, job_id, "task-b", tune_request(max_downtime_ms=500, by="ops"), ttl_s=60)
    assert pop_tune(store.r, job_id, "task-b") == TuneRequest(max_downtime_ms=500, by="ops")
    assert pop_tune(store.r, job_id, "task-b") is None  # taken once
    assert pop_tune(store.r, job_id, "task-a") == TuneRequest(bandwidth_mib=8)
    assert pop_tune(store.r, job_id, "task-c") is None
    store.r.hset(tune_key(job_id), "task-d", '{"bandwidth_mib": 99999999}')  # edited in Redis
    with pytest.raises(BadControlRequest, match="bandwidth_mib"):
        pop_tune(store.r, job_id, "task-d")
    store.r.delete(tune_key(job_id))
    store.r.rpush(tune_key(job_id), "not a hash")  # another type, by hand
    with pytest.raises(BadControlRequest, match="cannot be read"):
        pop_tune(store.r, job_id, "task-e")


def _job(store: JobStore, state: JobState | None = None) -> str:
    job_id = enqueue(store, MigrationSpec(domain="idle-1", src="kvm1", dst="kvm2"), origin="t")
    if state is not None:
        for step in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
            store.transition(job_id, step, host="kvm1")
            if step is state:
                break
    return job_id


def _one_line_refusal(config: Path, *args: str) -> str:
    done = run_drover(config, *args)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    "command", [["tune", "--bandwidth", "8"], ["force-complete"], ["postcopy"]]
)
def test_a_job_that_is_not_migrating_is_refused_with_its_state(
    config: Path, store: JobStore, command: list[str]
) -> None:
    queued = _job(store)
    line = _one_line_refusal(config, *command, queued)
    assert f"job {queued} is queued, not migrating" in line
    assert store.r.hlen(tune_key(queued)) == 0  # nothing was put in line for a worker


def test_bad_numbers_are_refused_before_anything_is_sent(config: Path, store: JobStore) -> None:
    migrating = _job(store, JobState.MIGRATING)
    line = _one_line_refusal(config, "tune", migrating, "--max-downtime", "0")
    assert "--max-downtime 0: Input should be greater than or equal to 1" in line
    line = _one_line_refusal(config, "tune", migrating)
    assert "give at least one of --bandwidth" in line
    assert store.r.hlen(tune_key(migrating)) == 0


@pytest.mark.parametrize(
    ("command", "what"), [("force-complete", "force-complete"), ("postcopy", "post-copy")]
)
def test_no_answer_from_the_source_worker_is_said_not_hung_on(
    config: Path, store: JobStore, command: str, what: str
) -> None:
    """Probe: `drover postcopy` said "post-copy requested" and exit 0 with no worker to
    make the switch (and when the worker refused it): it now waits for the answer, and
    says what may still become of the request (a probe: told "no answer", the restarted
    worker made the switch from its queue), naming the job, not "ID"."""
    waits = "control_reply_timeout = 1\ncontrol_setup_wait = 0.5\ncontrol_lock_wait = 0.5"
    config.write_text(config.read_text() + f"\n[tunables]\n{waits}\n")
    migrating = _job(store, JobState.MIGRATING)
    line = _one_line_refusal(config, command, migrating)
    assert line == (
        f"drover: no answer from kvm1's worker to {what} of job {migrating} within 2s: the "
        "request expired after 1s unless that worker took it before, and then it may still "
        f"be carried out (drover events {migrating} --follow)\n"
    )


def _answering(store: JobStore, config: Path, event: str, **fields: str) -> ControlRequests:
    """The producer's side, with a send that answers as the source worker would."""

    def send(signature: Any) -> None:
        job_id, request = signature.args[0], signature.options["task_id"]
        assert signature.task == POSTCOPY_TASK and signature.options["queue"] == host_queue("kvm1")
        store.append_event(job_id, {"event": event, "job_id": job_id, "request": request, **fields})

    return ControlRequests(load_settings(config), store, Celery("t"), send, "test")


def test_postcopy_answers_with_the_switch_the_worker_made(store: JobStore, config: Path) -> None:
    migrating = _job(store, JobState.MIGRATING)
    requests = _answering(
        store, config, "policy.step", action="postcopy", by="operator", reason="drover postcopy"
    )
    line = requests.postcopy(migrating)
    assert line == f"job {migrating}: switched to post-copy (drover postcopy)"


def test_postcopy_says_the_workers_refusal(store: JobStore, config: Path) -> None:
    migrating = _job(store, JobState.MIGRATING)
    requests = _answering(store, config, "control.refused", reason="job is being aborted")
    with pytest.raises(SubmitError, match="post-copy refused by kvm1: job is being aborted"):
        requests.postcopy(migrating)


def test_jobs_table_shows_the_downtime(store: JobStore) -> None:
    job_id = _job(store, JobState.MIGRATING)
    landed = parse_completed(PRECOPY_STATS, "job-completed event", switched=False)
    store.update(job_id, result=landed.result_fields())
    job = store.get(job_id)
    assert downtime_cell(job) == "27 ms"
    assert "downtime" in [c.header for c in jobs_table([job]).columns]
    store.update(job_id, result={"downtime_ms": 180, "mode": "postcopy"})
    assert downtime_cell(store.get(job_id)) == "180 ms (postcopy)"


def test_an_operators_step_is_shown_with_what_it_set_not_the_policys_figures() -> None:
    """`drover events` printed a tune as `[None MiB left, None MiB/s sent, pass None]`."""
    base = {"ts": "2026-12-04T15:00:00+00:00", "host": "kvm1", "event": "policy.step"}
    tune = base | {"action": "tune", "by": "operator", "reason": "asked", "bandwidth_mib": 12}
    line = event_line(tune)
    assert "bandwidth_mib=12" in line and "None" not in line
    forced = base | {"action": "suspend", "by": "operator", "reason": "force-complete"}
    forced |= {"data_remaining": 4096, "memory_iteration": 3}
    line = event_line(forced)
    assert "data_remaining=4096 memory_iteration=3" in line and "None" not in line
    policy = base | {"action": "postcopy", "by": "policy", "reason": "r", "remaining_mib": 5}
    assert "5 MiB left" in event_line(policy)


def test_a_step_held_for_the_operator_is_not_shown_as_refused_by_libvirt() -> None:
    """Probe: a raise held for the operator's downtime read "libvirt refused: None"."""
    base = {"ts": "2026-12-04T15:00:00+00:00", "host": "kvm1", "event": "policy.step"}
    held = base | {"action": "raise_downtime", "by": "policy", "reason": "stalled"}
    held |= {"downtime_ms": 9000, "done": False, "held_by": "operator"}
    line = event_line(held | {"operator_downtime_ms": 777})
    assert "not made, held by the operator: 777 ms stands" in line and "refused" not in line
    assert "held by the operator)" in event_line(held | {"action": "postcopy"})
    refused = base | {"action": "postcopy", "by": "policy", "done": False, "error": "no"}
    assert "(libvirt refused: no)" in event_line(refused)


@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fleet_keys(tmp_path_factory.mktemp("keys"))


def test_a_signed_tune_is_taken_only_as_signed_for_its_job_and_task(
    tmp_path: Path, store: JobStore, fleet_keys: Path
) -> None:
    """Attacker probe: the numbers beside a tune's task were rewritten in Redis before the
    source worker took them (an uncapped bandwidth, a 60 s pause allowed, "asked by" a name
    of the attacker's), and libvirt applied them. With signing on only what a trusted key
    signed for this job and this task is taken; anything else is refused in one line."""
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url="redis://127.0.0.1:1/0") + signing_section(fleet_keys))
    security = load_settings(config).security
    signer, verifier = signer_for(security), verifier_for(security)
    job_id, other_job = "0123456789ab", "ba9876543210"
    key = tune_key(job_id)

    def pushed(request_id: str, job: str = job_id, **values: Any) -> str:
        push_tune(store.r, job, request_id, tune_request(**values), 60, signer)
        return str(store.r.hget(tune_key(job), request_id))

    pushed("task-a", bandwidth_mib=2, by="ops@site")
    taken = pop_tune(store.r, job_id, "task-a", verifier)
    assert taken == TuneRequest(bandwidth_mib=2, by="ops@site")

    # Its numbers and its name changed, the signature left as it was.
    signed = json.loads(pushed("task-b", bandwidth_mib=2, by="ops@site"))
    payload = json.loads(signed["payload"])
    payload["spec"].update(bandwidth_mib=1_000_000, max_downtime_ms=60_000, by="alice@ops")
    signed["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    store.r.hset(key, "task-b", json.dumps(signed))
    with pytest.raises(BadControlRequest, match="signature does not verify"):
        pop_tune(store.r, job_id, "task-b", verifier)

    refusals = {
        # Plain numbers, as the producer wrote them before: nobody signed them.
        "task-c": ('{"bandwidth_mib": 1000000}', "malformed"),
        # A real signed request, put under another task's id.
        "task-d": (pushed("task-x", max_downtime_ms=60_000), "signed for another request"),
        # One signed for another job.
        "task-e": (pushed("task-e", other_job, bandwidth_mib=0), f"not {job_id}"),
    }
    for request_id, (raw, why) in refusals.items():
        store.r.hset(key, request_id, raw)
        with pytest.raises(BadControlRequest, match=why) as exc:
            pop_tune(store.r, job_id, request_id, verifier)
        assert str(exc.value).startswith("the tune request is refused") or why == "malformed"
        assert "\n" not in str(exc.value)

    # Another kind of signed record (a destination's receipt for this job) is no tune.
    receipt = sign_prepared(signer, job_id, "kvm2", "uuid-1", datetime.now(UTC))
    assert receipt is not None
    store.r.hset(key, "task-f", receipt)
    with pytest.raises(BadControlRequest, match="it is a signed prepared"):
        pop_tune(store.r, job_id, "task-f", verifier)
