"""A value a caller typed, of any length, is quoted where the refusal is built, as
config/addresses.py shown() quotes it: a Python API caller (producer/api.py's Drover) gets one
short line, not a 10 KB id, host or policy name echoed back, and so do the commands that print
such a refusal (`drover policies NAME`, `drover migrate --xml PATH`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.addresses import MAX_SHOWN_CHARS
from config.settings import load_settings
from jobs.keys import job_key
from producer.api import Drover
from producer.xml_files import XMLFileError, read_xml_file
from schedules.beat import run_beat
from schedules.cron import parse_at, parse_cron
from schedules.records import ScheduleError, check_schedule_id
from tests.unit.test_hostile_inputs import run_cli

LONG = "x" * 10_000
CUT = "... (1000"  # shown(): the value cut, and how long it was (10,000 and some characters)
# Longest a refusal quoting LONG may be: the cut value and the words around it (a list of
# the states there are, say).
MAX_MESSAGE = MAX_SHOWN_CHARS + 300

API_CALLS: dict[str, Callable[[Drover], Any]] = {
    "abort": lambda d: d.abort(LONG),
    "start_postcopy": lambda d: d.start_postcopy(LONG),
    "tune": lambda d: d.tune(LONG, bandwidth_mib=5),
    "force_complete": lambda d: d.force_complete(LONG),
    "job": lambda d: d.job(LONG),
    "record": lambda d: d.record(LONG),
    "evacuation": lambda d: d.evacuation(LONG),
    "abort_evacuation": lambda d: d.abort_evacuation(LONG),
    "wait": lambda d: d.wait(LONG, timeout=1),
    "wait_evacuation": lambda d: d.wait_evacuation(LONG, timeout=1),
    "events": lambda d: list(d.events(LONG)),
    "events follow": lambda d: list(d.events(LONG, follow=True, timeout=1)),
    "set_host_enabled": lambda d: d.set_host_enabled(LONG, False),
    "jobs host": lambda d: d.jobs(host=LONG),
    "jobs since": lambda d: d.jobs(since=LONG),
    "jobs states": lambda d: d.jobs(states=["failed", LONG]),
    "submit policy": lambda d: d.submit(domain="web01", src="kvm1", dst="kvm2", policy=LONG),
}


def short(exc: BaseException) -> str:
    said = str(exc)
    assert "\n" not in said and len(said) <= MAX_MESSAGE, said[:MAX_MESSAGE]
    assert CUT in said, said[:MAX_MESSAGE]
    return said


@pytest.mark.parametrize("call", list(API_CALLS))
def test_the_api_quotes_a_long_value_in_one_short_line(call: str, config: Path) -> None:
    d = Drover(load_settings(config), notice=lambda _: None)
    with pytest.raises(Exception) as refused:
        API_CALLS[call](d)
    short(refused.value)


def test_a_record_of_the_other_kind_is_named_short(config: Path) -> None:
    """An evacuation's id asked for as a migration job: refused naming it, as shown() does."""
    d = Drover(load_settings(config), notice=lambda _: None)
    evacuation_id = "0123456789ab"
    d.store.r.hset(job_key(evacuation_id), mapping={"id": evacuation_id, "kind": "evacuation"})
    with pytest.raises(Exception) as refused:
        d.job(evacuation_id)
    assert str(refused.value) == f"{evacuation_id!r} is an 'evacuation', not a migration job"


@pytest.mark.parametrize(
    "refuse",
    [
        lambda: parse_cron(LONG),
        lambda: parse_cron("0 3 * * " + LONG),
        lambda: parse_at(LONG),
        lambda: check_schedule_id(LONG),
        lambda: read_xml_file("/" + LONG, "--xml"),
        lambda: read_xml_file(LONG, "--xml"),
    ],
    ids=["cron", "cron field", "at", "schedule id", "xml absolute path", "xml relative path"],
)
def test_refusals_below_the_command_line_quote_short(refuse: Callable[[], Any]) -> None:
    with pytest.raises((ScheduleError, XMLFileError)) as refused:
        refuse()
    short(refused.value)


def test_the_beat_quotes_a_long_loglevel_short(config: Path) -> None:
    with pytest.raises(ScheduleError) as refused:
        run_beat(load_settings(config), loglevel=LONG)
    short(refused.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["policies", LONG],
        ["policies", LONG, "--json"],
        ["migrate", "web01", "--from", "kvm1", "--to", "kvm2", "--xml", "/" + LONG],
        ["migrate", "web01", "--from", "kvm1", "--to", "kvm2", "--persistent-xml", LONG],
    ],
    ids=lambda argv: " ".join(argv).replace(LONG, "LONG"),
)
def test_commands_quote_a_long_value_short(
    argv: list[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    code, out, err = run_cli(argv)
    assert out == "" and "Traceback" not in err, err[:2000]
    assert code != 0
    assert err.count("\n") == 1 and len(err) <= MAX_MESSAGE + len("drover: \n"), err[:MAX_MESSAGE]
    assert CUT in err, err[:MAX_MESSAGE]
