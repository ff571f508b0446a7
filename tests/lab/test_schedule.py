"""Scheduled evacuations on the real lab: `drover beat` fires them, the host's worker evacuates.

The beats run as `drover beat` subprocesses with the lab's config (signed messages, as the
lab signs by default), so what is proven is the operator's path: the fired message is
accepted by the worker, the evacuation runs through libvirt, and one beat fires at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import libvirt
import pytest
import redis

from config.settings import load_settings
from jobs.evacuation import EVACUATION_KIND
from jobs.keys import SCHEDULE_INDEX, SCHEDULE_LOCK, schedule_entry_key
from jobs.store import JOBS_INDEX, job_key
from lab import control
from lab.layout import LabLayout
from schedules.records import RECORD_FIELD
from schedules.store import ScheduleStore
from tests.support.cli import run_drover
from tests.support.lab_fixtures import IDLE_GUESTS, Lab, wait_for
from worker.schedule_tasks import origin

pytestmark = pytest.mark.lab

# The schedule is added this far ahead of now, once the beat holds its lock.
AHEAD_S = 5
BEAT_START_TIMEOUT_S = 60
BEAT_STOP_TIMEOUT_S = 15
# From the scheduled time until the worker has created the evacuation.
FIRE_TIMEOUT_S = 60
EVACUATION_TIMEOUT_S = 300
# How long the waiting beat is watched after the firing, for a second firing it must not do.
STANDBY_WATCH_S = 5
POLL_S = 0.2
GUESTS = (*IDLE_GUESTS, "dirty-1")
DESTINATIONS = ("lab2", "lab3")


def drover(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return run_drover(lab.config, *args)


class Beat:
    """One `drover beat` process, its output in a file."""

    def __init__(self, lab: Lab, log: Path) -> None:
        self.log = log
        env = {**os.environ, "DROVER_CONFIG": lab.config}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "beat"], stdout=out, stderr=out, env=env
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> None:
        wait_for(
            lambda: "beat: Starting" in self.text() or self.proc.poll() is not None,
            BEAT_START_TIMEOUT_S,
            f"beat to start ({self.log})",
        )
        assert self.proc.poll() is None, self.text()

    def holds_lock(self) -> bool:
        return "beat: Acquired lock" in self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(BEAT_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def beats(lab: Lab) -> Iterator[list[Beat]]:
    """Beats a test starts; every one is stopped afterwards, whatever happened."""
    started: list[Beat] = []
    yield started
    for beat in started:
        beat.stop()


@pytest.fixture
def store(lab: Lab) -> ScheduleStore:
    return ScheduleStore(load_settings(lab.config))


def redis_of(lab: Lab) -> redis.Redis:
    return redis.Redis.from_url(load_settings(lab.config).redis_url, decode_responses=True)


def add_once(lab: Lab, host: str, *extra: str) -> str:
    # Whole seconds: --at refuses a fraction (the schedule keeps seconds only).
    at = (datetime.now(UTC) + timedelta(seconds=AHEAD_S)).replace(microsecond=0).isoformat()
    result = drover(lab, "schedule", "add", "evacuate", host, "--at", at, *extra, "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["id"])


def evacuations_from(lab: Lab, schedule_id: str) -> list[str]:
    """Ids of the evacuations whose origin is this schedule."""
    r = redis_of(lab)
    ids = cast(list[str], r.zrange(JOBS_INDEX, 0, -1))
    found = []
    for job_id in ids:
        kind, started_by = cast(list[str | None], r.hmget(job_key(job_id), ["kind", "origin"]))
        if kind == EVACUATION_KIND and started_by == origin(schedule_id):
            found.append(job_id)
    return found


def running_domains(lab: Lab, host: str) -> list[str]:
    conn = libvirt.open(lab.uri(host))
    try:
        return sorted(
            d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        )
    finally:
        conn.close()


def worker_events(host: str, name: str) -> list[dict[str, object]]:
    """The structured events called `name` in `host`'s worker log."""
    state = control.LabState.load(LabLayout.from_env())
    assert state is not None
    found = []
    for line in Path(state.hosts[host].worker_log).read_text(errors="replace").splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def start_beat(lab: Lab, beats: list[Beat], tmp_path: Path) -> Beat:
    """One `drover beat`, started and holding the lock (so it fires what comes due)."""
    beat = Beat(lab, tmp_path / "beat.log")
    beats.append(beat)
    beat.wait_started()
    wait_for(beat.holds_lock, BEAT_START_TIMEOUT_S, "the beat to take its lock")
    return beat


def holds_for(cond: Callable[[], bool], seconds: float, what: str) -> None:
    """`cond` stays true for `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cond(), what
        time.sleep(POLL_S)


def test_a_scheduled_evacuation_fires_and_drains_the_host(
    lab: Lab, beats: list[Beat], store: ScheduleStore, tmp_path: Path
) -> None:
    assert load_settings(lab.config).security.signing  # beat signs, lab1's worker verifies
    lab.all_home()
    assert running_domains(lab, "lab1") == sorted(GUESTS)
    schedule_id = None
    try:
        start_beat(lab, beats, tmp_path)
        schedule_id = add_once(lab, "lab1", "--to", ",".join(DESTINATIONS))
        sid = schedule_id
        wait_for(
            lambda: bool(evacuations_from(lab, sid)),
            AHEAD_S + FIRE_TIMEOUT_S,
            "the schedule to start an evacuation",
        )
        (evacuation_id,) = evacuations_from(lab, sid)
        evacuation = lab.drover.wait_evacuation(evacuation_id, EVACUATION_TIMEOUT_S)
        assert evacuation.state.value == "drained", evacuation.reason
        assert evacuation.origin == f"schedule:{sid}"
        assert evacuation.spec.to == list(DESTINATIONS)

        assert running_domains(lab, "lab1") == []
        for guest in GUESTS:
            (where,) = lab.running_on(guest)
            assert where in DESTINATIONS

        shown = store.get(sid)
        assert shown.fired and shown.next_run is None and shown.runs == 1
        assert shown.last_run is not None and shown.last_run.evacuation_id == evacuation_id
        assert f"Sending due task {sid}" in beats[0].text()
        (event,) = [e for e in worker_events("lab1", "schedule.fired") if e["schedule_id"] == sid]
        assert event["evacuation_id"] == evacuation_id
        rejected = worker_events("lab1", "message.rejected")
        assert not [e for e in rejected if "scheduled_evacuation" in str(e.get("task"))]
        assert evacuations_from(lab, sid) == [evacuation_id]
    finally:
        for beat in beats:
            beat.stop()
        if schedule_id is not None:
            drover(lab, "schedule", "remove", schedule_id)
        lab.all_home()  # enables every host, brings the guests back to lab1


def test_a_second_beat_fires_nothing_while_the_first_holds_the_lock(
    lab: Lab, beats: list[Beat], store: ScheduleStore, tmp_path: Path
) -> None:
    """Two beats, one schedule, one evacuation; the waiting beat takes over afterwards.

    lab2 runs no guest here, so its evacuation is quick: planned empty, drained.
    """
    lab.all_home()
    assert running_domains(lab, "lab2") == []
    schedule_id = None
    try:
        beats.append(Beat(lab, tmp_path / "beat1.log"))
        beats[0].wait_started()
        wait_for(beats[0].holds_lock, BEAT_START_TIMEOUT_S, "beat 1 to take the lock")
        holder = redis_of(lab).get(SCHEDULE_LOCK)
        beats.append(Beat(lab, tmp_path / "beat2.log"))
        beats[1].wait_started()

        schedule_id = add_once(lab, "lab2")
        sid = schedule_id
        wait_for(
            lambda: store.get(sid).last_run is not None,
            AHEAD_S + FIRE_TIMEOUT_S,
            "the schedule to fire",
        )
        (evacuation_id,) = evacuations_from(lab, sid)
        evacuation = lab.drover.wait_evacuation(evacuation_id, EVACUATION_TIMEOUT_S)
        assert evacuation.state.value == "drained", evacuation.reason

        # The waiting beat never took the lock, so it never looked at the schedule.
        holds_for(
            lambda: evacuations_from(lab, sid) == [evacuation_id],
            STANDBY_WATCH_S,
            "one evacuation only",
        )
        assert store.get(sid).runs == 1
        assert not beats[1].holds_lock() and sid not in beats[1].text()
        assert redis_of(lab).get(SCHEDULE_LOCK) == holder

        beats[0].stop()
        assert beats[0].proc.returncode == 0, beats[0].text()
        wait_for(beats[1].holds_lock, BEAT_START_TIMEOUT_S, "beat 2 to take over the lock")
        assert evacuations_from(lab, sid) == [evacuation_id]
    finally:
        for beat in beats:
            beat.stop()
        if schedule_id is not None:
            drover(lab, "schedule", "remove", schedule_id)
        lab.drover.set_host_enabled("lab2", True)
    assert redis_of(lab).get(SCHEDULE_LOCK) is None


def test_a_schedule_changed_in_redis_fires_nothing(
    lab: Lab, beats: list[Beat], store: ScheduleStore, tmp_path: Path
) -> None:
    """Its record says to drain lab1 onto lab3 only, but `drover schedule add` signed lab2:
    the worker refuses it when it fires, says why, and no guest moves."""
    lab.all_home()
    before = running_domains(lab, "lab1")
    start_beat(lab, beats, tmp_path)
    sid = add_once(lab, "lab1", "--to", "lab2")
    try:
        record = store.record(sid)
        tampered = record.model_copy(
            update={"request": record.request.model_copy(update={"to": ["lab3"]})}
        )
        redis_of(lab).hset(schedule_entry_key(sid), RECORD_FIELD, tampered.model_dump_json())

        def refused() -> bool:
            last = store.get(sid).last_run
            return last is not None and bool(last.error)

        wait_for(refused, AHEAD_S + FIRE_TIMEOUT_S, "the worker to refuse the schedule")
        last_run = store.get(sid).last_run
        assert last_run is not None and str(last_run.error).startswith("security: "), last_run
        assert "spec is not what was signed" in str(last_run.error)
        assert evacuations_from(lab, sid) == []
        assert running_domains(lab, "lab1") == before
        events = worker_events("lab1", "security.rejected")
        assert [e for e in events if e.get("schedule_id") == sid]
    finally:
        drover(lab, "schedule", "remove", sid)


# How often the rewritten beat entry sends the schedule (redbeat's interval schedule, in s).
REWRITTEN_EVERY_S = 2.0


def test_a_rewritten_beat_entry_starts_nothing_off_its_signed_time(
    lab: Lab, beats: list[Beat], store: ScheduleStore, tmp_path: Path
) -> None:
    """`drover schedule add` signed a drain of lab1 on the 1st of January at 03:00; someone
    with a Redis password rewrites redbeat's entry (`definition`) to send it every 2 s, now.
    The beat sends it, and lab1's worker refuses each firing (not a time the signed cron
    names): no evacuation, no guest moves (before, lab1 was drained within seconds)."""
    lab.all_home()
    before = running_domains(lab, "lab1")
    start_beat(lab, beats, tmp_path)
    added = drover(lab, "schedule", "add", "evacuate", "lab1", "--cron", "0 3 1 1 *", "--json")
    assert added.returncode == 0, added.stderr
    sid = str(json.loads(added.stdout)["id"])
    r, key = redis_of(lab), schedule_entry_key(sid)
    try:
        definition = json.loads(cast(str, r.hget(key, "definition")))
        definition["schedule"] = {
            "__type__": "interval",
            "every": REWRITTEN_EVERY_S,
            "relative": False,
        }
        r.hset(key, "definition", json.dumps(definition))
        r.zadd(SCHEDULE_INDEX, {key: time.time()})

        def refused_twice() -> bool:
            return store.get(sid).runs >= 2

        wait_for(refused_twice, FIRE_TIMEOUT_S, "lab1's worker to refuse two firings")
        last_run = store.get(sid).last_run
        assert last_run is not None and last_run.evacuation_id is None
        assert "not at a time its cron '0 3 1 1 *'" in str(last_run.error), last_run
        assert evacuations_from(lab, sid) == []
        assert running_domains(lab, "lab1") == before
        refusals = [
            e for e in worker_events("lab1", "schedule.refused") if e.get("schedule_id") == sid
        ]
        assert len(refusals) >= 2
    finally:
        drover(lab, "schedule", "remove", sid)


# A one-shot far enough ahead to remove it and write it back before its time.
REPLAY_AHEAD_S = 20


def test_a_removed_schedule_written_back_starts_nothing(
    lab: Lab, beats: list[Beat], store: ScheduleStore, tmp_path: Path
) -> None:
    """Someone who can read Redis saves a signed one-shot's entry; the operator removes the
    schedule; the entry is written back whole (it verifies) and the beat sends it at its
    time. lab1's worker was told of the removal and starts nothing (before: lab1 drained)."""
    lab.all_home()
    before = running_domains(lab, "lab1")
    start_beat(lab, beats, tmp_path)
    at = (datetime.now(UTC) + timedelta(seconds=REPLAY_AHEAD_S)).replace(microsecond=0)
    added = drover(lab, "schedule", "add", "evacuate", "lab1", "--at", at.isoformat(), "--json")
    assert added.returncode == 0, added.stderr
    sid = str(json.loads(added.stdout)["id"])
    r, key = redis_of(lab), schedule_entry_key(sid)
    saved = cast(dict[str, str], r.hgetall(key))
    score = cast(float | None, r.zscore(SCHEDULE_INDEX, key))
    assert saved and score is not None
    removed = drover(lab, "schedule", "remove", sid)
    assert removed.returncode == 0, removed.stderr

    def told() -> bool:
        return any(e.get("schedule_id") == sid for e in worker_events("lab1", "schedule.removed"))

    wait_for(told, FIRE_TIMEOUT_S, "lab1's worker to be told of the removal")
    r.hset(key, mapping=saved)
    r.zadd(SCHEDULE_INDEX, {key: score})
    try:

        def ignored() -> list[dict[str, object]]:
            found = worker_events("lab1", "schedule.ignored")
            return [e for e in found if e.get("schedule_id") == sid]

        wait_for(lambda: bool(ignored()), REPLAY_AHEAD_S + FIRE_TIMEOUT_S, "the firing")
        assert str(ignored()[0]["reason"]).startswith("removed (drover schedule remove)")
        assert evacuations_from(lab, sid) == []
        assert running_domains(lab, "lab1") == before
    finally:
        drover(lab, "schedule", "remove", sid)
