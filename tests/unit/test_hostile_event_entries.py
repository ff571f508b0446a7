"""Entries in a job's event stream that drover did not write (anyone with the Redis password
can add them) are passed over, each said once, by every reader: `drover events`, `--follow`,
`migrate --wait`'s progress, tune and force-complete go on to the real events and end as they
would. Numbers in a progress event that are no numbers show as unknown. Against the real test
Redis; the CLI as a separate process."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from rich.console import Console

from config.events import job_event
from config.settings import load_settings
from jobs.errors import SubmitError
from jobs.follow import follow, is_end_event
from jobs.keys import events_key
from jobs.phases import TUNE_TASK
from jobs.spec import MigrationSpec
from jobs.states import TERMINAL, JobState
from jobs.store import JobStore
from producer import follow as producer_follow
from producer.api import Drover
from producer.control import ControlRequests
from producer.render import event_line
from tests.support.cli import run_drover
from tests.support.lab_fixtures import wait_for

SPEC = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
# What someone with the Redis password can XADD: the fields of each entry.
BAD_ENTRIES: dict[str, dict[Any, Any]] = {
    "no-data": {"foo": "bar"},
    "not-json": {"data": "{bad"},
    "a-list": {"data": "[1,2]"},
    "a-string": {"data": '"just a string"'},
    "not-utf8": {"data": b"\xff\xfe{}"},
    "too-deep": {"data": "[" * 100_000},
}
SETTLE_S = 20.0


def add_bad_entries(store: JobStore, job_id: str) -> list[str]:
    return [str(store.r.xadd(events_key(job_id), fields)) for fields in BAD_ENTRIES.values()]


def add_event(store: JobStore, job_id: str, name: str, **fields: Any) -> None:
    store.append_event(job_id, job_event(name, "test", job_id=job_id, **fields))


def end(store: JobStore, job_id: str) -> None:
    add_event(store, job_id, "job.state", state="cancelled")
    store.transition(job_id, JobState.CANCELLED, host="test")


class Said:
    """A `skipped` that keeps what it was told."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def __call__(self, entry_id: str, why: str) -> None:
        self.entries.append((entry_id, why))

    @property
    def ids(self) -> list[str]:
        return [eid for eid, _ in self.entries]


# --- the reader -------------------------------------------------------------------------


@pytest.mark.parametrize("block_ms", [None, 10])
def test_read_events_passes_over_each_entry_that_is_no_event_and_says_it(
    store: JobStore, block_ms: int | None
) -> None:
    job_id = store.create(SPEC, host="test")
    add_event(store, job_id, "job.queued")
    bad = add_bad_entries(store, job_id)
    add_event(store, job_id, "job.admitted")
    said = Said()

    events = store.read_events(job_id, block_ms=block_ms, skipped=said)

    assert [ev["event"] for _, ev in events] == ["job.queued", "job.admitted"]
    assert said.ids == bad
    reasons = [why for _, why in said.entries]
    assert reasons[0] == "no 'data' field"
    assert "is not JSON" in reasons[1] and "not a JSON object but list" in reasons[2]
    assert all("\n" not in why for why in reasons)
    batch = store.read_batch(job_id, block_ms=block_ms)
    assert batch.last == events[-1][0]


def test_tune_answers_from_past_entries_that_are_no_events(store: JobStore, config: Path) -> None:
    """The newest entry before the request is not UTF-8, and junk lands before the answer."""
    job_id = store.create(SPEC, host="test")
    store.r.xadd(events_key(job_id), {"data": b"\xff"})
    job = store.get(job_id)

    def send(signature: Any) -> None:
        request = signature.options["task_id"]
        add_bad_entries(store, job_id)
        add_event(store, job_id, "control.refused", request=request, reason="not now")

    requests = ControlRequests(load_settings(config), store, Celery("t"), send, "test")
    with pytest.raises(SubmitError, match="tune refused by kvm1: not now"):
        requests._ask(job, TUNE_TASK, "tune", lambda _: None)


# --- following ------------------------------------------------------------------------


def test_a_follower_says_an_entry_once_and_goes_on_to_the_end_event(store: JobStore) -> None:
    """The junk is the stream's last entry while the job runs: read on from, not again."""
    job_id = store.create(SPEC, host="test")
    add_event(store, job_id, "job.queued")
    bad = str(store.r.xadd(events_key(job_id), {"foo": "bar"}))
    said = Said()
    seen: list[str] = []

    def run() -> None:
        ended: Callable[[], bool] = lambda: store.state(job_id) in TERMINAL  # noqa: E731
        for _, ev in follow(store, job_id, ended, block_ms=50, skipped=said, grace_s=SETTLE_S):
            seen.append(ev["event"])

    follower = threading.Thread(target=run, daemon=True)
    follower.start()
    wait_for(lambda: seen == ["job.queued"] and said.ids == [bad], SETTLE_S, "the first read")
    end(store, job_id)
    follower.join(SETTLE_S)
    assert not follower.is_alive()
    assert seen == ["job.queued", "job.state"]
    assert said.ids == [bad]


def test_an_end_event_of_the_wrong_shape_is_no_end() -> None:
    for state in ([1], {"a": 1}, None, 3):
        assert not is_end_event({"event": "job.state", "state": state})
    assert is_end_event({"event": "job.state", "state": "succeeded"})


def test_migrate_wait_progress_goes_on_to_the_end(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    job_id = store.create(SPEC, host="test")
    add_event(store, job_id, "job.queued")
    add_bad_entries(store, job_id)
    add_event(store, job_id, "migration.progress", stage="transfer", data_total="lots")
    add_event(store, job_id, "migration.progress", data_total=[1], data_remaining={"a": 1})
    add_event(store, job_id, "migration.progress", data_total=10**400, data_remaining=1e308)
    end(store, job_id)
    out = io.StringIO()
    notices: list[str] = []

    job = producer_follow.follow(
        Drover(load_settings(config), notice=notices.append),
        job_id,
        Console(file=out, width=200),
        timeout=SETTLE_S,
    )

    assert job.state is JobState.CANCELLED
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    names = [line.split()[3] for line in lines]
    assert names == ["job.queued", *["migration.progress"] * 3, "job.state"]
    assert "sent 0.0 MiB of ? MiB" in lines[1] and "Traceback" not in out.getvalue()


# --- what a person sees -------------------------------------------------------------------

HOSTILE = ["lots", [1, "a"], {"a": [1]}, 10**400, -1, 1e308, True, None, "", "\x1b[2J"]
KEYS = [
    "ts", "host", "phase", "state", "reason", "stage", "data_total", "data_processed",
    "data_remaining", "memory_bandwidth", "memory_dirty_rate", "memory_iteration", "domain",
    "dst", "child", "placements", "call", "action", "downtime_ms", "skipped", "done", "error",
    "remaining_mib", "dirty_mib_s", "transfer_mib_s", "iteration",
]  # fmt: skip
NAMES = [
    "migration.progress", "evacuation.child_queued", "evacuation.planned", "policy.step",
    "migration.started", "job.state",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_an_event_line_of_any_values_is_one_line(name: str) -> None:
    for key in KEYS:
        for value in HOSTILE:
            line = event_line({"event": name, key: value})
            assert "\n" not in line and "\x1b" not in line
    nested = {"placements": [1, None, {"destination": "x"}], "call": {"flags": 3}}
    assert "1 of 3 domains placed" in event_line({"event": "evacuation.planned", **nested})
    assert event_line({"event": "migration.started", "call": {"api": "a", "flags": [1, "b"]}})


def test_the_cli_prints_the_events_past_the_junk_and_exits_as_usual(
    store: JobStore, config: Path
) -> None:
    job_id = store.create(SPEC, host="test")
    add_event(store, job_id, "job.queued")
    bad = add_bad_entries(store, job_id)
    add_event(store, job_id, "migration.progress", stage="transfer", data_total="lots")
    end(store, job_id)

    for args in ([], ["--follow"]):
        done = run_drover(config, "events", job_id, *args)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        printed = [line.split()[3] for line in done.stdout.splitlines()]
        assert printed == ["job.queued", "migration.progress", "job.state"]
        said = done.stderr.splitlines()  # one line for each entry passed over, naming it
        assert len(said) == len(bad), said
        assert all(
            f"stream entry {eid} skipped" in line for eid, line in zip(bad, said, strict=True)
        )
    as_json = run_drover(config, "events", job_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line)["event"] for line in as_json.stdout.splitlines()][-1] == "job.state"


def test_wait_passes_over_a_state_event_whose_state_is_no_string(
    store: JobStore, config: Path
) -> None:
    """`Drover.wait` (what `drover migrate --wait --json` runs): a `job.state` entry whose
    `state` is a list used to raise TypeError (unhashable) out of the wait."""
    job_id = store.create(SPEC, host="test")
    add_event(store, job_id, "job.state", state=["cancelled"])
    add_event(store, job_id, "job.state", state={"a": 1})
    end(store, job_id)
    job = Drover(load_settings(config)).wait(job_id, timeout=SETTLE_S)
    assert job.state is JobState.CANCELLED
