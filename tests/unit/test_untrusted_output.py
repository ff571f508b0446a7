"""What the CLI shows from Redis is shown literally: no Rich markup, no escape sequences.

Redis content is not trusted. These tests write hostile text straight into the real test Redis
(a maintenance reason, a job's reason, a worker's report, an event, a schedule's last run) and
read it back through the real CLI: `[red]` shows as typed, a stray `[/]` does not crash Rich,
and no control character reaches the terminal.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from config.events import job_event
from config.settings import load_settings
from jobs.maintenance import DISABLED_HOSTS, Disabled
from jobs.spec import MigrationSpec
from jobs.store import JobStore, job_key
from producer.text import cell, plain, plain_data
from schedules.records import EvacuationRequest, LastRun
from schedules.store import ScheduleStore
from tests.conftest import RedisServer
from tests.unit.test_cli_errors import drover

# Markup Rich would apply (or choke on: `[/]` closes nothing), OSC 52 (clipboard), CSI (clear
# screen), a C1 CSI, a bidi override, and a newline that would forge a line of output.
MARKUP = ["[red]alarm[/red]", "[/]", "[link=x]y[/link]"]
HOSTILE = " ".join(MARKUP) + " \x1b]52;c;aGk=\x07\x1b[2J\x9b31m\u202eevil\nforged line"
CONTROLS = ["\x1b", "\x07", "\x9b", "\u202e", "\x7f"]
REPORT_TTL_S = 60


def assert_harmless(text: str) -> None:
    for char in CONTROLS:
        assert char not in text, (char, text)
    assert not any(line.lstrip().startswith("forged") for line in text.splitlines()), text


def assert_shown_literally(text: str) -> None:
    assert_harmless(text)
    for markup in MARKUP:
        assert markup in text, (markup, text)
    assert "]52;c;aGk=" in text  # what is left of the sequence shows, inert


@pytest.fixture
def r(config: Path, redis_srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_srv.url, decode_responses=True)


def hostile_job(store: JobStore) -> str:
    job_id = store.create(MigrationSpec(domain="idle-1", src="kvm1", dst="kvm2"), host="test")
    store.r.hset(job_key(job_id), mapping={"reason": HOSTILE, "state": "failed"})
    return job_id


def test_hosts_shows_a_hostile_reason_and_report_literally(
    config: Path, r: redis.Redis, store: JobStore
) -> None:
    since = datetime.now(UTC).isoformat()
    r.hset(DISABLED_HOSTS, "kvm2", Disabled(since=since, reason=HOSTILE, by="x").model_dump_json())
    store.report_host(
        "kvm1",
        {"free_mib": "[bold]9[/bold]", "running": ["[blink]web[/blink]", "db\x1b[2J"]},
        REPORT_TTL_S,
    )
    result = drover(config, "hosts")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_shown_literally(result.stdout)
    assert "[bold]9[/bold] MiB" in result.stdout and "[blink]web[/blink]" in result.stdout


def test_a_refusal_quoting_a_hostile_reason_is_one_harmless_line(
    config: Path, r: redis.Redis
) -> None:
    since = datetime.now(UTC).isoformat()
    r.hset(DISABLED_HOSTS, "kvm2", Disabled(since=since, reason=HOSTILE, by="x").model_dump_json())
    result = drover(config, "migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_shown_literally(result.stderr)
    # Disabling it again quotes the first reason back: harmless too.
    again = drover(config, "host", "disable", "kvm2", "--reason", "another")
    assert again.returncode == 0 and len(again.stdout.strip().splitlines()) == 1
    assert_shown_literally(again.stdout)


def test_jobs_and_job_show_a_hostile_reason_literally(config: Path, store: JobStore) -> None:
    job_id = hostile_job(store)
    table = drover(config, "jobs")
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert_shown_literally(table.stdout)

    shown = drover(config, "job", job_id)
    assert shown.returncode == 0, shown.stderr
    assert_harmless(shown.stdout)
    assert json.loads(shown.stdout)["reason"] == plain(HOSTILE)

    # --json is for programs: faithful, with every control character escaped by JSON.
    raw = drover(config, "job", job_id, "--json")
    assert json.loads(raw.stdout)["reason"] == HOSTILE
    assert_harmless(raw.stdout)


def test_events_show_a_hostile_reason_harmlessly(config: Path, store: JobStore) -> None:
    job_id = hostile_job(store)
    store.append_event(job_id, job_event("job.state", "x", job_id=job_id, reason=HOSTILE))
    result = drover(config, "events", job_id)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert_shown_literally(result.stdout)


def test_schedule_list_shows_a_hostile_last_run_literally(config: Path) -> None:
    schedules = ScheduleStore(load_settings(config))
    added = schedules.add_evacuation(EvacuationRequest(host="kvm1"), cron="0 3 * * *", by="t")
    schedules.record_run(added.id, LastRun(at=datetime.now(UTC), error=HOSTILE))
    result = drover(config, "schedule", "list")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_harmless(result.stdout)
    assert "[red]alarm[/red]" in result.stdout and "[/]" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[red]x[/red]", "\\[red]x\\[/red]"),
        ("a\x1b[2Jb", "a[2Jb"),
        ("bidi\u202eevil\u2028sep", "bidievilsep"),
        ("tab\tnew\nline\r", "tabnewline"),
        ("Wartung für RAM", "Wartung für RAM"),
    ],
)
def test_cell_strips_and_escapes(text: str, expected: str) -> None:
    assert cell(text) == expected


def test_plain_data_cleans_every_string_keys_too() -> None:
    assert plain_data({"a\x1b": ["x\x07", 1, None, {"k": "\x9bv"}]}) == {
        "a": ["x", 1, None, {"k": "v"}]
    }
