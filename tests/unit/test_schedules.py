"""Schedules without a hypervisor: strict parsing, the CLI's refusals, what an entry sends.

Everything that needs Redis uses the real private `redis_srv`; the beat runs in-process
(redbeat's scheduler ticking against that Redis) or as `drover beat` subprocesses, and the
messages it sends are read straight off the host's queue, where no worker consumes them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from celery.beat import Service
from redbeat.schedulers import RedBeatSchedulerEntry, acquire_distributed_beat_lock
from structlog.testing import capture_logs

from config.celery import host_queue
from config.security import argument_problem
from config.settings import load_settings
from jobs.drain_options import DrainOptions
from jobs.keys import (
    DISABLED_HOSTS,
    SCHEDULE_LOCK,
    SCHEDULE_PREFIX,
    heartbeat_key,
    schedule_entry_key,
)
from schedules.beat import REDBEAT_SCHEDULER
from schedules.cron import fire_slot, parse_at, parse_cron
from schedules.records import (
    FIRE_EARLY_LIMIT_S,
    FIRE_LATE_LIMIT_S,
    SCHEDULE_REMOVED_TASK,
    SCHEDULED_EVACUATION_TASK,
    EvacuationRequest,
    ScheduleError,
    ScheduleRecord,
)
from schedules.store import ScheduleStore
from tests.conftest import RedisServer, free_port
from tests.support.cli import run_drover
from tests.support.process import terminate
from tests.support.registry import REGISTRY
from worker.ledger import Ledger
from worker.schedule_tasks import fire

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
FIRE_TIMEOUT_S = 20
BEAT_START_TIMEOUT_S = 30
BEAT_STOP_TIMEOUT_S = 15
# How long the second beat is watched for not firing (a few of the first beat's ticks).
STANDBY_WATCH_S = 4
POLL_S = 0.05
# A one-shot's time from now: it must still be ahead when `drover schedule add` (a fresh
# process, slower on a busy machine) checks it.
SOON_S = 5


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def drover(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_drover(config, *args)


@pytest.fixture
def r(redis_srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_srv.url, decode_responses=True)


def queued_messages(r: redis.Redis, host: str) -> list[dict[str, Any]]:
    """Task messages waiting in `host`'s queue (kombu's Redis transport: a list of JSON)."""
    return [json.loads(raw) for raw in cast(list[str], r.lrange(host_queue(host), 0, -1))]


def body(message: dict[str, Any]) -> list[Any]:
    return list(json.loads(base64.b64decode(message["body"])))


# --- strict parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "0 3 * * *",
        "*/15 * * * *",
        "0 22 * * mon-fri",
        "30 2 1,15 jan-jun *",
        "0 0 * * 0",
        "0 0 * * sun-sat/2",
        "0 0 1 jan-dec *",
        "0 0 * 3-dec *",
        "0 3 */2 * mon",  # a field starting with * is unrestricted to cron too: both match
    ],
)
def test_valid_cron_expressions(expr: str) -> None:
    schedule = parse_cron(expr, reference=NOW)
    assert schedule.remaining_estimate(NOW).total_seconds() >= 0


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 3 * *", "4 fields, need 5"),
        ("0 3 * * * *", "6 fields, need 5"),
        ("", "only digits"),
        ("61 * * * *", "minute 61 is outside 0-59"),
        ("0 24 * * *", "hour 24 is outside 0-23"),
        ("0 0 0 * *", "day of month 0 is outside 1-31"),
        ("0 0 * 13 *", "month 13 is outside 1-12"),
        ("0 0 * * 7", "day of week 7 is outside 0-6"),
        ("30-10 * * * *", "minute range 30-10 runs backwards"),
        ("0 0 * * fri-mon", "day of week range fri-mon runs backwards"),
        ("0 0 * * FRI-MON", "day of week range fri-mon runs backwards"),
        ("0 0 * * sat-sun", "day of week range sat-sun runs backwards"),
        ("0 0 * * 5-mon", "day of week range 5-mon runs backwards"),
        ("0 0 1 dec-jan *", "month range dec-jan runs backwards"),
        ("0 0 1 nov-feb/2 *", "month range nov-feb runs backwards"),
        ("0 0 * feb-1 *", "month range feb-1 runs backwards"),
        ("0 0 * * jan", "day of week 'jan' is neither a number nor one of sun, mon"),
        ("0 0 * mon *", "month 'mon' is neither a number nor one of jan, feb"),
        ("*/0 * * * *", "minute step /0"),
        ("5/15 * * * *", "is not *, N, N-M"),
        ("0,,5 * * * *", "is not *, N, N-M"),
        ("abc * * * *", "minute takes numbers only"),
        ("0 0 * * xyz", "xyz"),
        ("0 0 31 2 *", "matches no day that exists"),
        ("0 3 1 * mon", "restricts both the day of month and the day of week"),
        ("0 3 13 * 5", "restricts both the day of month and the day of week"),
        ("0 3 1-7 * 1-5", "restricts both the day of month and the day of week"),
        ("0 3 * * *;reboot", "only digits"),
        ("0\t3 * * *\n*", "only digits"),
        ("\uff10 3 * * *", "only digits"),  # a full-width zero
    ],
)
def test_bad_cron_expressions_are_refused_in_one_line(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_cron(expr, reference=NOW)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text.replace(repr(expr), "")


def test_at_without_an_offset_is_utc() -> None:
    assert parse_at("2030-06-01T14:30:00", reference=NOW) == datetime(
        2030, 6, 1, 14, 30, tzinfo=UTC
    )


def test_at_with_an_offset_is_converted_to_utc() -> None:
    when = parse_at("2030-06-01T16:30:00.000+02:00", reference=NOW)
    assert when == datetime(2030, 6, 1, 14, 30, tzinfo=UTC)
    assert when.tzinfo == UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2030-06-01T11:59:59Z", "--at 2030-06-01T11:59:59Z is in the past (now 2030-06-01T12"),
        ("2030-06-01T12:00:00Z", "is in the past"),
        ("2030-06-01T13:00:00+02:00", "--at 2030-06-01T11:00:00Z is in the past"),
        ("tomorrow", "is not an ISO-8601 time"),
        ("2030-13-01T00:00:00", "is not an ISO-8601 time"),
        ("", "is not an ISO-8601 time"),
        ("9999-12-31T23:59:59-14:00", "is out of range: in UTC it must fall within the years"),
        ("0001-01-01T00:00:00+14:00", "is out of range"),
        ("2030-06-01T16:30:00.750+02:00", "has a fraction of a second: schedules keep whole"),
    ],
)
def test_bad_or_past_at_is_refused(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=None) as caught:
        parse_at(text, reference=NOW)
    assert message in str(caught.value)


# --- the CLI: one line, exit 2, nothing in Redis -----------------------------------------------


def soon(seconds: float = 60) -> str:
    # Whole seconds: --at refuses a fraction (the schedule keeps seconds only).
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0).isoformat()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kvm1"], "give exactly one of --cron EXPR and --at TIME"),
        (["kvm1", "--cron", "0 3 * * *", "--at", "2099-01-01T00:00:00"], "exactly one of"),
        (["kvm1", "--cron", "61 3 * * *"], "minute 61 is outside 0-59"),
        (["kvm1", "--cron", "0 0 30 2 *"], "matches no day that exists"),
        (["kvm1", "--at", "2001-01-01T00:00:00"], "--at 2001-01-01T00:00:00Z is in the past"),
        (["kvm1", "--at", "next tuesday"], "is not an ISO-8601 time"),
        (["kvm1", "--at", "9999-12-31T23:59:59-14:00"], "is out of range"),
        (["kvm9", "--cron", "0 3 * * *"], "unknown host 'kvm9' (known hosts: kvm1, kvm2)"),
        (["../etc", "--cron", "0 3 * * *"], "unknown host '../etc'"),
        (["kvm1", "--cron", "0 3 * * *", "--to", "kvm2,kvm7"], "unknown host 'kvm7'"),
        (["kvm1", "--cron", "0 3 * * *", "--to", "kvm2,,kvm1"], "empty host name"),
        (["kvm1", "--cron", "0 3 * * *", "--to", "kvm1"], "the host being evacuated"),
        (["kvm1", "--cron", "0 3 * * *", "--to", "kvm2,kvm2"], "names kvm2 twice"),
        (["kvm1", "--cron", "0 3 * * *", "--max-parallel", "0"], "--max-parallel"),
        (["kvm1", "--cron", "0 3 * * *", "--max-parallel", "65"], "--max-parallel"),
    ],
)
def test_bad_schedule_requests_are_one_line_and_reach_nothing(
    config: Path, r: redis.Redis, args: list[str], message: str
) -> None:
    result = drover(config, "schedule", "add", "evacuate", *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert r.keys("*") == []


@pytest.mark.parametrize(
    ("schedule_id", "message"),
    [
        ("0123456789ab", "no schedule '0123456789ab'"),
        ("lock", "invalid schedule id 'lock'"),
        (":schedule", "invalid schedule id"),
        ("0123456789AB", "invalid schedule id"),
    ],
)
def test_removing_what_is_not_a_schedule(
    config: Path, r: redis.Redis, schedule_id: str, message: str
) -> None:
    result = drover(config, "schedule", "remove", schedule_id)
    assert result.returncode == 2
    assert result.stderr.strip() == f"drover: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert r.keys("*") == []


def test_unreachable_redis_is_one_line_without_the_password(tmp_path: Path) -> None:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=f"redis://:sekret@127.0.0.1:{free_port()}/0"))
    for args in (("list",), ("add", "evacuate", "kvm1", "--cron", "0 3 * * *")):
        result = drover(path, "schedule", *args)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "sekret" not in result.stderr and "Traceback" not in result.stderr
    beat = drover(path, "beat")
    assert beat.returncode == 1 and len(beat.stderr.strip().splitlines()) == 1, beat.stderr


def test_bad_beat_loglevel_is_one_line(config: Path) -> None:
    result = drover(config, "beat", "--loglevel", "LOUD")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "drover: --loglevel 'LOUD': one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


# --- add, list, remove ------------------------------------------------------------------------


def test_add_list_remove_through_the_cli(config: Path, r: redis.Redis) -> None:
    at = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    naive = at.replace(tzinfo=None).isoformat()
    added = drover(
        config, "schedule", "add", "evacuate", "kvm1", "--at", naive, "--to", "kvm2", "--json"
    )
    assert added.returncode == 0, added.stderr
    one = json.loads(added.stdout)
    assert one["at"] == one["next_run"] == at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert one["request"] == {
        "host": "kvm1",
        "to": ["kvm2"],
        "max_parallel": None,
        "include_inactive": False,
        **DrainOptions().model_dump(mode="json"),  # every child option, at its default
    }
    assert (one["fired"], one["last_run"], one["runs"]) == (False, None, 0)

    cron = drover(
        config,
        "schedule",
        "add",
        "evacuate",
        "kvm2",
        "--cron",
        "0  3 * *  SAT",
        "--max-parallel",
        "2",
        "--include-inactive",
    )
    assert cron.returncode == 0, cron.stderr
    assert "(times in UTC)" in cron.stdout and "cron '0 3 * * sat' UTC" in cron.stdout

    listed = json.loads(drover(config, "schedule", "list", "--json").stdout)
    assert listed[0]["id"] == one["id"]
    weekly = listed[1]
    assert weekly["what"] == "evacuate kvm2 to any host, 2 at a time, inactive too"
    next_run = datetime.fromisoformat(weekly["next_run"])
    assert next_run > datetime.now(UTC) and next_run.weekday() == 5  # Python's Saturday
    assert (next_run.hour, next_run.minute) == (3, 0)

    table = drover(config, "schedule", "list")
    assert one["id"] in table.stdout and "evacuate kvm1 to kvm2" in table.stdout

    removed = drover(config, "schedule", "remove", one["id"])
    assert removed.returncode == 0 and one["id"] in removed.stdout
    assert [s["id"] for s in json.loads(drover(config, "schedule", "list", "--json").stdout)] == [
        weekly["id"]
    ]
    assert not r.exists(schedule_entry_key(one["id"]))
    # The evacuated host's worker is told (it never fires the schedule again): one message
    # with the id alone, on kvm1's queue.
    told = [m for m in queued_messages(r, "kvm1") if m["headers"]["task"] == SCHEDULE_REMOVED_TASK]
    assert len(told) == 1
    args, kwargs, _ = body(told[0])
    assert args == [one["id"]] and argument_problem(args, kwargs) is None


def test_a_stored_expression_refused_today_still_lists(config: Path, r: redis.Redis) -> None:
    """An entry stored before backwards names were refused shows, with no next run, and can
    be removed: one refused expression must not hide every schedule."""
    store = ScheduleStore(load_settings(config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 0 * * mon-fri", by="t")
    record = store.record(added.id).model_copy(update={"cron": "0 0 * * fri-mon"})
    r.hset(schedule_entry_key(added.id), "drover", record.model_dump_json())
    listed = drover(config, "schedule", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["cron"], entry["next_run"]) == ("0 0 * * fri-mon", None)
    assert drover(config, "schedule", "remove", added.id).returncode == 0


def test_an_entry_sends_only_its_id_to_the_evacuated_hosts_queue(config: Path) -> None:
    store = ScheduleStore(load_settings(config))
    request = EvacuationRequest(host="kvm2", to=["kvm1"])
    added = store.add_evacuation(request, cron="*/5 * * * *", by="test")
    definition = json.loads(cast(str, store.r.hget(schedule_entry_key(added.id), "definition")))
    assert definition["task"] == SCHEDULED_EVACUATION_TASK
    assert argument_problem(definition["args"], definition["kwargs"]) is None
    assert definition["args"] == [added.id]
    assert definition["options"] == {"queue": host_queue("kvm2"), "expires": FIRE_LATE_LIMIT_S}
    assert store.r.zscore(store.index_key, schedule_entry_key(added.id)) is not None
    assert schedule_entry_key(added.id).startswith(SCHEDULE_PREFIX)


# --- the beat, in-process and as `drover beat` ---------------------------------------------------


def test_a_schedule_keeps_every_drain_option_and_refuses_bad_ones(config: Path) -> None:
    at = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0).isoformat()
    base = ("schedule", "add", "evacuate", "kvm1", "--at", at, "--json")
    added = drover(
        config,
        *base,
        *("--tls", "--copy-storage", "all", "--parallel", "2", "--compressed"),
        *("--comp-methods", "xbzrle,mt", "--comp-mt-level", "1", "--comp-xbzrle-cache", "16"),
    )
    assert added.returncode == 0, added.stderr
    request = json.loads(added.stdout)["request"]
    assert (request["tls"], request["copy_storage"], request["parallel"]) == (True, "all", 2)
    assert request["compressed"] is True
    compression = request["compression"]
    assert compression["methods"] == ["xbzrle", "mt"]
    assert (compression["mt_level"], compression["xbzrle_cache_mib"]) == (1, 16)
    for bad, says in (
        (("--comp-zlib-level", "3"), "--comp-zlib-level needs zlib in --comp-methods"),
        (("--copy-storage", "some"), "--copy-storage"),
        (("--tunnelled", "--parallel", "2"), "--parallel cannot be tunnelled"),
        (("--tunnelled", "--tls"), "--tls cannot be tunnelled"),
    ):
        refused = drover(config, *base, *bad)
        assert refused.returncode == 2, refused.stdout
        line = refused.stderr.strip()
        assert says in line and "\n" not in line and "Traceback" not in line, line


@pytest.fixture
def scheduler(config: Path) -> Iterator[Any]:
    """redbeat's scheduler on the test Redis, holding the beat lock as `drover beat` would."""
    store = ScheduleStore(load_settings(config))
    service = Service(app=store.app, max_interval=1, scheduler_cls=REDBEAT_SCHEDULER)
    acquire_distributed_beat_lock(sender=service)
    yield service.scheduler
    service.scheduler.close()


def test_a_one_shot_fires_once_with_a_message_the_worker_accepts(
    config: Path, r: redis.Redis, scheduler: Any
) -> None:
    store = ScheduleStore(load_settings(config))
    at = soon(SOON_S)
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), at=at, by="test")
    scheduler.tick()
    assert queued_messages(r, "kvm1") == []  # not before its time

    def ticked_until_sent() -> bool:
        scheduler.tick()
        return bool(queued_messages(r, "kvm1"))

    wait_for(ticked_until_sent, FIRE_TIMEOUT_S, "the one-shot to fire")
    for _ in range(3):  # later ticks never send it again
        scheduler.tick()
    (message,) = queued_messages(r, "kvm1")
    args, kwargs, _ = body(message)
    assert message["headers"]["task"] == SCHEDULED_EVACUATION_TASK
    assert args == [added.id] and argument_problem(args, kwargs) is None
    assert message["headers"]["expires"] is not None
    shown = store.get(added.id)
    assert shown.fired and shown.next_run is None and shown.sent_at is not None
    assert "(fired)" in shown.when()


def test_a_cron_time_missed_while_no_beat_ran_is_not_caught_up(
    config: Path, r: redis.Redis, scheduler: Any
) -> None:
    """A beat back after a missed 1st of January does not evacuate on the 2nd of March."""
    store = ScheduleStore(load_settings(config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 0 1 1 *", by="test")
    entry = RedBeatSchedulerEntry.from_key(schedule_entry_key(added.id), app=store.app)
    entry.reschedule(last_run_at=datetime.now(UTC) - timedelta(days=2 * 365))
    for _ in range(3):
        scheduler.tick()
    assert queued_messages(r, "kvm1") == []
    next_run = store.get(added.id).next_run
    assert next_run is not None and next_run > datetime.now(UTC)
    assert (next_run.month, next_run.day, next_run.hour, next_run.minute) == (1, 1, 0, 0)


def test_a_new_cron_entry_waits_for_its_first_match(
    config: Path, r: redis.Redis, scheduler: Any
) -> None:
    """Without a last run Celery would call a new crontab overdue and fire it at once.

    The cron time chosen passed two minutes ago: recent enough for the catch-up deadline.
    """
    store = ScheduleStore(load_settings(config))
    passed = datetime.now(UTC) - timedelta(minutes=2)
    cron = f"{passed.minute} {passed.hour} * * *"
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron=cron, by="test")
    for _ in range(3):
        scheduler.tick()
    assert queued_messages(r, "kvm1") == []
    next_run = store.get(added.id).next_run
    assert next_run is not None and next_run - passed > timedelta(hours=23)


def start_beat(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DROVER_CONFIG": str(config)}
    env.pop("DROVER_REDIS_URL", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "beat"], stdout=out, stderr=out, env=env
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    terminate(proc, BEAT_STOP_TIMEOUT_S)


def test_a_second_beat_waits_for_the_lock_and_takes_over(
    config: Path, r: redis.Redis, tmp_path: Path
) -> None:
    first_log, second_log = tmp_path / "beat1.log", tmp_path / "beat2.log"
    first = start_beat(config, first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: "Acquired lock" in first_log.read_text(), BEAT_START_TIMEOUT_S, "beat 1")
        holder = r.get(SCHEDULE_LOCK)
        second = start_beat(config, second_log)
        wait_for(lambda: "beat: Starting" in second_log.read_text(), BEAT_START_TIMEOUT_S, "beat 2")
        at = soon(SOON_S)
        added = drover(config, "schedule", "add", "evacuate", "kvm1", "--at", at, "--json")
        schedule_id = json.loads(added.stdout)["id"]
        wait_for(lambda: bool(queued_messages(r, "kvm1")), FIRE_TIMEOUT_S, "the schedule to fire")
        deadline = time.monotonic() + STANDBY_WATCH_S
        while time.monotonic() < deadline:
            assert len(queued_messages(r, "kvm1")) == 1
            time.sleep(POLL_S)
        assert "Acquired lock" not in second_log.read_text()
        assert r.get(SCHEDULE_LOCK) == holder
        assert schedule_id in first_log.read_text() and schedule_id not in second_log.read_text()

        stop(first)
        assert first.returncode == 0, first_log.read_text()
        wait_for(
            lambda: "Acquired lock" in second_log.read_text(),
            BEAT_START_TIMEOUT_S,
            "beat 2 to take over",
        )
        assert r.get(SCHEDULE_LOCK) not in (None, holder)
        assert len(queued_messages(r, "kvm1")) == 1
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert r.get(SCHEDULE_LOCK) is None  # released on a normal stop


# --- the task's side, before any evacuation ----------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """The host's own ledger, as a worker hands it to the firing."""
    return Ledger(str(tmp_path / "ledger"))


def cron_now() -> str:
    """A daily cron whose time is this minute: a firing now answers it."""
    current = datetime.now(UTC)
    return f"{current.minute} {current.hour} * * *"


@pytest.fixture
def worker_config(config: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return config


def test_a_removed_schedule_is_logged_and_ignored(worker_config: Path, ledger: Ledger) -> None:
    with capture_logs() as logs:
        assert fire("0123456789ab", message_id="m1", node="drover@kvm1", ledger=ledger) is None
    assert [(e["event"], e["schedule_id"]) for e in logs] == [("schedule.ignored", "0123456789ab")]
    assert "removed" in logs[0]["reason"]


def test_a_firing_on_another_hosts_worker_is_ignored(worker_config: Path, ledger: Ledger) -> None:
    store = ScheduleStore(load_settings(worker_config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="test")
    with capture_logs() as logs:
        assert fire(added.id, message_id="m1", node="drover@kvm2", ledger=ledger) is None
    assert logs[0]["event"] == "schedule.ignored" and "not kvm1" in logs[0]["reason"]
    assert store.get(added.id).runs == 0


def test_a_refused_evacuation_is_recorded_once_per_message(
    worker_config: Path, ledger: Ledger
) -> None:
    """kvm1 has no live worker here, so the evacuation itself refuses; the run records why."""
    store = ScheduleStore(load_settings(worker_config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron=cron_now(), by="test")
    with capture_logs() as logs:
        assert fire(added.id, message_id="m1", node="drover@kvm1", ledger=ledger) is None
        assert (
            fire(added.id, message_id="m1", node="drover@kvm1", ledger=ledger) is None
        )  # delivered twice
    assert [e["event"] for e in logs] == ["schedule.refused", "schedule.ignored"]
    shown = store.get(added.id)
    assert shown.runs == 1
    assert shown.last_run is not None and shown.last_run.evacuation_id is None
    assert "worker is not alive" in str(shown.last_run.error)


def record_at(when: datetime) -> ScheduleRecord:
    return ScheduleRecord(
        id="0123456789ab",
        request=EvacuationRequest(host="kvm1"),
        at=when,
        created=when - timedelta(days=1),
        created_by="test",
    )


def test_a_one_shot_counts_only_at_its_signed_time() -> None:
    on_time = NOW + timedelta(seconds=FIRE_LATE_LIMIT_S)
    assert fire_slot(record_at(NOW), on_time) == NOW
    late = fire_slot(record_at(NOW), on_time + timedelta(seconds=1))
    assert isinstance(late, str) and "fired 601 s after its time 2030-06-01T12:00:00Z" in late
    assert fire_slot(record_at(NOW), NOW - timedelta(seconds=FIRE_EARLY_LIMIT_S)) == NOW
    early = fire_slot(record_at(NOW), NOW - timedelta(days=30))  # a rewritten beat entry
    assert early == (
        "fired 2592000 s before its time 2030-06-01T12:00:00Z; a schedule fires only at the "
        "time it was signed for"
    )


def test_a_cron_firing_counts_only_near_a_time_its_signed_cron_names() -> None:
    cron = record_at(NOW).model_copy(update={"at": None, "cron": "0 3 * * *"})
    three = NOW.replace(hour=3, minute=0)
    assert fire_slot(cron, three) == three
    assert fire_slot(cron, three + timedelta(seconds=FIRE_LATE_LIMIT_S)) == three
    assert fire_slot(cron, three - timedelta(seconds=FIRE_EARLY_LIMIT_S)) == three
    for off in (FIRE_LATE_LIMIT_S + 1, -FIRE_EARLY_LIMIT_S - 1, 86_400 // 2):
        refused = fire_slot(cron, three + timedelta(seconds=off))
        assert isinstance(refused, str) and "not at a time its cron '0 3 * * *'" in refused
    # Several times in the window: the latest, so that each fires once and none is skipped.
    every_5 = cron.model_copy(update={"cron": "*/5 * * * *"})
    assert fire_slot(every_5, three + timedelta(minutes=7)) == three + timedelta(minutes=5)
    assert fire_slot(every_5, three + timedelta(minutes=9, seconds=30)) == three + timedelta(
        minutes=10
    )


def test_a_signed_time_fires_once_here_whatever_the_messages(
    worker_config: Path, ledger: Ledger
) -> None:
    """A rewritten beat entry sends the schedule again and again within its window (each a
    new message id, so the claim in Redis lets each through): one evacuation per time."""
    store = ScheduleStore(load_settings(worker_config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron=cron_now(), by="test")
    with capture_logs() as logs:
        assert fire(added.id, message_id="m1", node="drover@kvm1", ledger=ledger) is None
        assert fire(added.id, message_id="m2", node="drover@kvm1", ledger=ledger) is None
    assert [e["event"] for e in logs] == ["schedule.refused", "schedule.ignored"]
    assert logs[1]["reason"].startswith("already fired for its time ")
    assert store.get(added.id).runs == 1  # the first: refused by the evacuation (no worker)


def test_a_key_of_another_type_refuses_the_run_and_records_it(
    worker_config: Path, ledger: Ledger
) -> None:
    """A key the evacuation writes, set by hand to another type (WRONGTYPE from Redis): no
    outage, so the firing task used to fail with Redis's error and no run was recorded."""
    store = ScheduleStore(load_settings(worker_config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron=cron_now(), by="test")
    store.r.set(heartbeat_key("kvm1"), "worker-1", px=60_000)  # kvm1's worker is alive
    store.r.set(DISABLED_HOSTS, "not a hash")
    try:
        with capture_logs() as logs:
            assert fire(added.id, message_id="m1", node="drover@kvm1", ledger=ledger) is None
    finally:
        store.r.delete(DISABLED_HOSTS, heartbeat_key("kvm1"))
    assert [e["event"] for e in logs] == ["schedule.refused"]
    assert "WRONGTYPE" in logs[0]["reason"]
    assert store.get(added.id).runs == 1


def test_a_removed_schedule_written_back_fires_nothing_where_its_host_was_told(
    worker_config: Path, ledger: Ledger
) -> None:
    """Its entry saved before `drover schedule remove` and written back whole, signature and
    all: it verifies, but the host's ledger holds the removal (drover.schedule_removed)."""
    store = ScheduleStore(load_settings(worker_config))
    added = store.add_evacuation(EvacuationRequest(host="kvm1"), cron=cron_now(), by="test")
    key = schedule_entry_key(added.id)
    saved = cast(dict[str, str], store.r.hgetall(key))
    assert store.remove(added.id) == "kvm1"
    store.r.hset(key, mapping=saved)
    assert store.verified_record(added.id).id == added.id  # the signature still holds
    ledger.remove_schedule(added.id)  # what drover.schedule_removed does on kvm1
    with capture_logs() as logs:
        assert fire(added.id, message_id="m1", node="drover@kvm1", ledger=ledger) is None
    assert [e["event"] for e in logs] == ["schedule.ignored"]
    assert logs[0]["reason"].startswith("removed (drover schedule remove)")
    assert store.get(added.id).runs == 0
    store.remove(added.id)
