"""`drover evacuate`, `drover host` and `drover hosts` at the CLI, against a real Redis.

Bad input is one line and a non-zero exit, and nothing reaches Redis; maintenance mode is
honoured by every submission.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from jobs.evacuation import DomainOutcome
from producer.render import outcome_table
from tests.conftest import RedisServer
from tests.unit.test_cli_errors import drover, queued_anything


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kvm1", "--to", "kvm1"], "--to includes kvm1, the host being evacuated"),
        (["kvm1", "--to", "kvm2,,kvm2"], "has an empty host name"),
        (["kvm1", "--to", "kvm2,kvm2"], "--to names kvm2 twice"),
        (["kvm9"], "unknown host 'kvm9' (known hosts: kvm1, kvm2)"),
        (["kvm1", "--to", "kvm7"], "unknown host 'kvm7'"),
        (["kvm1", "--max-parallel", "0"], "--max-parallel"),
        (["kvm1", "--bandwidth", "0"], "--bandwidth"),
        (["kvm1", "--timeout-action", "abort"], "--timeout-action needs --completion-timeout"),
        (
            ["kvm1", "--tunnelled", "--completion-timeout", "60", "--timeout-action", "postcopy"],
            "--timeout-action postcopy cannot be tunnelled",
        ),
        (["kvm1", "--tunnelled", "--tls"], "--tls cannot be tunnelled"),
        (["kvm1", "--policy", "nope"], "unknown policy 'nope' (known policies: default, manual"),
        (["kvm1", "--policy", "Bad Name"], "invalid --policy 'Bad Name'"),
        (["kvm1"], "kvm1's worker is not alive; it plans the evacuation of its host"),
        (["kvm1", "--timeout", "5"], "--timeout applies only with --wait"),
        (["kvm1", "--wait", "--timeout", "0"], "--timeout must be above 0 seconds, not 0"),
        (["kvm1", "--wait", "--timeout", "nan"], "must be a finite number of seconds, not nan"),
        (["kvm1", "--dry-run", "--timeout", "-inf"], "finite number of seconds, not -inf"),
    ],
)
def test_bad_evacuations_are_one_line_and_queue_nothing(
    config: Path, redis_srv: RedisServer, args: list[str], message: str
) -> None:
    result = drover(config, "evacuate", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not queued_anything(redis_srv)


def test_maintenance_mode_refuses_a_destination_until_enabled(config: Path) -> None:
    result = drover(config, "host", "disable", "kvm2", "--reason", "new DIMMs")
    assert result.returncode == 0 and "kvm2 disabled" in result.stdout
    refused = drover(config, "migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("drover: kvm2 is disabled for maintenance since")
    assert "(new DIMMs); `drover host enable kvm2` puts it back" in refused.stderr
    rows = {r["host"]: r for r in json.loads(drover(config, "hosts", "--json").stdout)}
    assert rows["kvm2"]["state"] == "disabled" and rows["kvm2"]["disabled_reason"] == "new DIMMs"
    assert rows["kvm1"]["state"] == "enabled" and not rows["kvm1"]["worker_alive"]
    assert drover(config, "host", "enable", "kvm2").stdout.strip() == "kvm2 enabled"
    assert drover(config, "host", "enable", "kvm2").stdout.strip() == "kvm2 was not disabled"
    unknown = drover(config, "host", "disable", "kvm9")
    assert unknown.returncode == 2 and "unknown host 'kvm9'" in unknown.stderr


@pytest.mark.parametrize("reason", ["Wartung für RAM", "[red]x[/red] 100% done", "r" * 200])
def test_a_reason_is_any_printable_text_up_to_200_characters(config: Path, reason: str) -> None:
    result = drover(config, "host", "disable", "kvm2", "--reason", reason)
    assert result.returncode == 0, result.stderr
    rows = {r["host"]: r for r in json.loads(drover(config, "hosts", "--json").stdout)}
    assert rows["kvm2"]["disabled_reason"] == reason


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("\x1b]52;c;aGk=\x07", "must be printable text on one line: character 1 is '\\x1b'"),
        ("two\nlines", "character 4 is '\\n'"),
        ("r" * 201, "is 201 characters; at most 200"),
        (" ", "is empty"),
    ],
)
def test_a_bad_reason_is_one_line_and_disables_nothing(
    config: Path, redis_srv: RedisServer, reason: str, message: str
) -> None:
    result = drover(config, "host", "disable", "kvm2", "--reason", reason)
    assert result.returncode == 2
    assert result.stderr.startswith("drover: the maintenance reason (--reason) ")
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not queued_anything(redis_srv)


def test_the_outcome_table_never_shows_an_unasked_destination_as_empty() -> None:
    """'running on' is '-' where libvirt showed the domain nowhere, and says it is unknown
    where its destination's libvirtd could not be asked."""
    outcome = [
        DomainOutcome(
            domain="asked", job_id="a" * 12, job_state="succeeded", on_source=False,
            running_on=None, reason="libvirt shows it neither here nor on kvm2",
        ),
        DomainOutcome(
            domain="unasked", job_id="b" * 12, job_state="succeeded", on_source=False,
            running_on=None, destination_unreachable="cannot reach qemu+tcp://192.0.2.2/system",
            reason="kvm2's libvirtd could not be asked",
        ),
    ]  # fmt: skip
    text = io.StringIO()
    Console(file=text, width=300).print(outcome_table(outcome, "kvm1"))
    rows = {
        cells[1].strip(): line
        for line in text.getvalue().splitlines()
        if len(cells := line.split("│")) > 2
    }
    unasked, asked = rows["unasked"], rows["asked"]
    assert "unknown: not reachable" in unasked
    assert "unknown" not in asked and " - " in asked
