"""A schedule entry written into Redis by hand stops neither `drover beat`, nor `drover schedule
list`, nor the fleet exporter: each entry is read on its own, and one that cannot be read is
left out and said, once (docs/security.md: Redis says which job to work on, never what to do).
Against the real test Redis; the beat in-process and as `drover beat`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.beat import Service
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from redbeat.schedulers import acquire_distributed_beat_lock
from structlog.testing import capture_logs

from config.settings import load_settings
from jobs.keys import SCHEDULE_INDEX, schedule_entry_key
from producer.exporter_collector import FleetCollector
from schedules.beat import REDBEAT_SCHEDULER
from schedules.records import EvacuationRequest, UnreadableSchedule
from schedules.store import ScheduleStore
from tests.conftest import RedisServer
from tests.support.cli import run_drover
from tests.unit.test_schedules import (
    BEAT_START_TIMEOUT_S,
    FIRE_TIMEOUT_S,
    queued_messages,
    soon,
    start_beat,
    stop,
    wait_for,
)
from worker.ledger import Ledger
from worker.schedule_tasks import fire

TICKS = 5
# (field, value) pairs anyone with the Redis password can write into an entry.
BAD_META = '{"last_run_at":"yesterday","total_run_count":1}'  # the probe's
HOSTILE = [
    ("meta", BAD_META),
    ("meta", "{bad"),
    ("meta", "[1, 2]"),
    ("meta", '{"last_run_at": null, "total_run_count": "many"}'),
    ("meta", '{"last_run_at": {"__type__": "crontab", "minute": "x"}}'),
    ("meta", '{"last_run_at": {"__type__": "datetime", "year": 2026, "month": 13, "day": 1}}'),
    (
        "meta",
        '{"last_run_at": {"__type__": "datetime", "timezone": "Nowhere/Else",'
        ' "year": 2026, "month": 1, "day": 1}}',
    ),
    ("definition", "{bad"),
    ("definition", '{"name": "x", "task": "celery.backend_cleanup", "schedule": 5}'),
]


@pytest.fixture
def r(redis_srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_srv.url, decode_responses=True)


@pytest.fixture
def store(config: Path) -> ScheduleStore:
    return ScheduleStore(load_settings(config))


def spoil(r: redis.Redis, schedule_id: str, field: str, value: str) -> str:
    """The probe's writes: the entry's field rewritten, and the entry made due at once."""
    key = schedule_entry_key(schedule_id)
    r.hset(key, field, value)
    r.zadd(SCHEDULE_INDEX, {key: 1})
    return key


@pytest.fixture
def scheduler(store: ScheduleStore) -> Iterator[Any]:
    """drover's beat scheduler on the test Redis, holding the lock as `drover beat` would."""
    service = Service(app=store.app, max_interval=1, scheduler_cls=REDBEAT_SCHEDULER)
    acquire_distributed_beat_lock(sender=service)
    yield service.scheduler
    service.scheduler.close()


def skipped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "beat: skipping" in r.getMessage()]


# --- the beat --------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), HOSTILE)
def test_the_beat_skips_an_entry_it_cannot_read_and_fires_the_others(
    store: ScheduleStore,
    r: redis.Redis,
    scheduler: Any,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: str,
) -> None:
    bad = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t").id
    good = store.add_evacuation(EvacuationRequest(host="kvm1"), at=soon(2), by="t").id
    spoil(r, bad, field, value)
    caplog.set_level(logging.INFO, logger="celery.beat")

    def ticked_until_sent() -> bool:
        scheduler.tick()  # raised AttributeError from redbeat's is_due (the probe's meta)
        return bool(queued_messages(r, "kvm1"))

    wait_for(ticked_until_sent, FIRE_TIMEOUT_S, "the good one-shot to fire")
    for _ in range(TICKS):
        scheduler.tick()
    assert store.get(good).fired and queued_messages(r, "kvm2") == []
    [line] = skipped(caplog)  # once per entry per run, however many ticks
    assert f"schedule {bad}" in line and f"{field}" in line and "\n" not in line
    assert r.zscore(SCHEDULE_INDEX, schedule_entry_key(bad)) is not None  # kept: removable


def test_an_entry_repaired_is_scheduled_again_and_said_again_if_spoilt_again(
    store: ScheduleStore, r: redis.Redis, scheduler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    entry = store.add_evacuation(EvacuationRequest(host="kvm1"), at=soon(3), by="t").id
    good_meta = str(r.hget(schedule_entry_key(entry), "meta"))
    caplog.set_level(logging.INFO, logger="celery.beat")
    spoil(r, entry, "meta", BAD_META)
    scheduler.tick()
    r.hset(schedule_entry_key(entry), "meta", good_meta)
    scheduler.tick()
    spoil(r, entry, "meta", "{bad")
    scheduler.tick()
    assert len(skipped(caplog)) == 2


def test_drover_beat_runs_on_past_a_bad_entry(
    config: Path, store: ScheduleStore, r: redis.Redis, tmp_path: Path
) -> None:
    """The probe's repro as it ran: the beat process exited on its first tick."""
    bad = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t").id
    spoil(r, bad, "meta", BAD_META)
    log = tmp_path / "beat.log"
    beat = start_beat(config, log)
    try:
        wait_for(lambda: "Acquired lock" in log.read_text(), BEAT_START_TIMEOUT_S, "the beat")
        store.add_evacuation(EvacuationRequest(host="kvm1"), at=soon(2), by="t")
        wait_for(lambda: bool(queued_messages(r, "kvm1")), FIRE_TIMEOUT_S, "the good one to fire")
        assert beat.poll() is None, log.read_text()
    finally:
        stop(beat)
    text = log.read_text()
    assert text.count("beat: skipping") == 1 and f"schedule {bad}" in text
    assert "Traceback" not in text and "CRITICAL" not in text


# --- drover schedule list / remove, and the worker's firing -----------------------------------


def cli_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line]


def test_schedule_list_leaves_out_what_it_cannot_read_in_one_line_each(
    config: Path, store: ScheduleStore, r: redis.Redis
) -> None:
    good = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t").id
    meta = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t").id
    record = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 4 * * *", by="t").id
    spoil(r, meta, "meta", BAD_META)
    spoil(r, record, "drover", "{bad")
    for args in (("--json",), ()):
        listed = run_drover(config, "schedule", "list", *args)
        assert listed.returncode == 0, listed.stderr  # exited with a traceback before
        lines = cli_lines(listed.stderr)
        assert len(lines) == 2 and "Traceback" not in listed.stderr, listed.stderr
        said = sorted(line.split(": its entry")[0] for line in lines)
        assert said == sorted(f"drover: schedule {s}" for s in (meta, record)), lines
        assert any(f"{meta}: its entry cannot be read: meta: " in line for line in lines)
        assert any(f"{record}: its entry cannot be read: drover: " in line for line in lines)
        assert all("left out of this list" in line for line in lines)
        assert good in listed.stdout and meta not in listed.stdout
    assert [
        s["id"] for s in json.loads(run_drover(config, "schedule", "list", "--json").stdout)
    ] == [good]
    for spoilt in (meta, record):  # the way out: remove it
        assert run_drover(config, "schedule", "remove", spoilt).returncode == 0
        assert not r.exists(schedule_entry_key(spoilt))
    assert cli_lines(run_drover(config, "schedule", "list").stderr) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("drover_runs", "-3"),
        ("drover_last_run", '{"at": "2026-01-01T00:00:00"}'),  # a time without its offset
        (
            "meta",
            '{"last_run_at": {"__type__": "datetime", "year": 9999, "month": 12,'
            ' "day": 31, "timezone": -50000}}',
        ),
    ],
)
def test_each_field_read_from_an_entry_is_checked(
    store: ScheduleStore, r: redis.Redis, field: str, value: str
) -> None:
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t").id
    spoil(r, added, field, value)
    unreadable: list[str] = []
    assert store.list(unreadable=unreadable) == []
    [said] = unreadable
    assert said.startswith(f"schedule {added}: its entry cannot be read: {field}: "), said
    with pytest.raises(UnreadableSchedule):
        store.get(added)


def test_a_record_naming_another_entry_is_not_read_as_that_one(
    store: ScheduleStore, r: redis.Redis
) -> None:
    """Removing or firing it would otherwise act on the schedule it names."""
    one = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t").id
    other = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t").id
    r.hset(schedule_entry_key(other), "drover", str(r.hget(schedule_entry_key(one), "drover")))
    unreadable: list[str] = []
    assert [s.id for s in store.list(unreadable=unreadable)] == [one]
    said = f"schedule {other}: its entry cannot be read: drover: its record is for schedule {one}"
    assert unreadable == [said]
    with pytest.raises(UnreadableSchedule):
        store.record(other)


def test_a_firing_of_an_unreadable_entry_is_logged_and_ignored(
    config: Path,
    store: ScheduleStore,
    r: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t").id
    spoil(r, added, "drover", "{bad")
    with capture_logs() as logs:
        assert (
            fire(added, message_id="m1", node="drover@kvm1", ledger=Ledger(str(tmp_path))) is None
        )  # raised before
    [said] = logs
    assert said["event"] == "record.unreadable" and said["schedule_id"] == added
    assert "drover: " in said["reason"]


# --- the fleet exporter --------------------------------------------------------------------------


def scrape(collector: FleetCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape as the exporter's HTTP handler makes it (an exception there: HTTP 500)."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_scrape_leaves_out_an_unreadable_schedule_and_keeps_every_other_series(
    config: Path, store: ScheduleStore, r: redis.Redis
) -> None:
    settings = load_settings(config)
    good = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t").id
    for field, value in (("meta", BAD_META), ("drover", "{bad")):
        spoilt = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t")
        spoil(r, spoilt.id, field, value)
    r.zadd(SCHEDULE_INDEX, {"drover:schedule:notahash": 2})
    r.set("drover:schedule:notahash", "x")
    r.hset("drover:schedule:two\nlines", "drover", "{bad")
    r.zadd(SCHEDULE_INDEX, {"drover:schedule:two\nlines": 3})
    collector = FleetCollector(lambda: settings, r, lambda: True)

    got = scrape(collector)  # raised AttributeError before: HTTP 500, every series lost

    assert got[("drover_exporter_redis_up", ())] == 1
    assert ("drover_workers_alive", (("host", "kvm1"),)) in got
    schedules = [labels for name, labels in got if name == "drover_schedules"]
    assert [dict(labels)["schedule_id"] for labels in schedules] == [good]


def test_an_entry_is_named_on_one_line_whatever_its_key(
    store: ScheduleStore, r: redis.Redis
) -> None:
    r.hset("drover:schedule:two\nlines", "drover", "{bad")
    r.zadd(SCHEDULE_INDEX, {"drover:schedule:two\nlines": 3})
    unreadable: list[str] = []
    assert store.list(unreadable=unreadable) == []
    [said] = unreadable
    assert said.startswith("schedule two\\nlines: its entry cannot be read: ") and "\n" not in said
