"""A migration or evacuation request as an operator may get it wrong: values of the wrong type
are refused, not coerced; a --listen-address only where the source will connect; a refusal
names the option the user typed and quotes at most a line of the value."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel, ValidationError

from config.settings import load_settings
from jobs.compression import CompressionOptions
from jobs.drain_options import DrainOptions
from jobs.errors import SubmitError
from jobs.evacuation_model import EvacuationSpec
from jobs.request_fields import OPTION_FLAGS
from jobs.spec import MigrationSpec, first_error
from jobs.validation import migration_spec
from schedules.records import EvacuationRequest
from tests.conftest import RedisServer
from tests.support.cli import run_drover

MIGRATION = {"domain": "idle-1", "src": "kvm1", "dst": "kvm2"}
MIGRATE = ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2"]
EVACUATION = {"host": "kvm1"}
LONG = "x" * 100_000


def refusal(model: type[BaseModel], values: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(values)
    return first_error(caught.value)


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("live", "yes", "--live"),
        ("live", "no", "--live"),
        ("live", 1, "--live"),
        ("dry_run", "yes", "--dry-run"),
        ("bandwidth_mib", True, "--bandwidth"),
        ("bandwidth_mib", "100", "--bandwidth"),
        ("parallel", "4", "--parallel"),
        ("completion_timeout_s", 10.0, "--completion-timeout"),
        ("disks_port", "5000", "--disks-port"),
        ("dname", b"web", "--dname"),
        ("domain", b"idle-1", "domain"),
    ],
)
def test_a_migration_takes_each_value_only_as_its_own_type(
    field: str, value: object, option: str
) -> None:
    said = refusal(MigrationSpec, MIGRATION | {field: value})
    assert said.startswith(option) and "Input should be a valid" in said, said


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("max_parallel", True, "--max-parallel"),
        ("max_parallel", "4", "--max-parallel"),
        ("dry_run", "yes", "--dry-run"),
        ("include_inactive", "no", "--include-inactive"),
        ("tunnelled", 1, "--tunnelled"),
        ("bandwidth_mib", True, "--bandwidth"),
        ("completion_timeout_s", 10.0, "--completion-timeout"),
        ("to", [b"kvm2"], "--to"),
    ],
)
def test_an_evacuation_takes_each_value_only_as_its_own_type(
    field: str, value: object, option: str
) -> None:
    said = refusal(EvacuationSpec, EVACUATION | {field: value})
    assert said.startswith(option) and "Input should be a valid" in said, said
    said = refusal(DrainOptions, {"tunnelled": "no"})
    assert said.startswith("--tunnelled 'no'"), said


def test_what_builds_the_models_still_does() -> None:
    """The CLI's words for enums and its lists, a record's JSON, a signed request's dict."""
    spec = MigrationSpec.model_validate(
        MIGRATION
        | {
            "control": "direct",
            "transport": "native",
            "copy_storage": "all",
            "migrate_disks": ["vda", "vdb"],
            "completion_timeout_s": 30,
            "timeout_action": "abort",
            "compression": {"methods": ["mt"], "mt_level": 3},
        }
    )
    assert spec.migrate_disks == ("vda", "vdb")
    assert MigrationSpec.model_validate_json(spec.model_dump_json()) == spec
    assert MigrationSpec.model_validate(spec.model_dump(mode="json")) == spec
    evacuation = EvacuationSpec.model_validate(
        EVACUATION | {"to": ("kvm2",), "copy_storage": "inc", "max_parallel": 2}
    )
    assert evacuation.to == ["kvm2"]
    assert EvacuationSpec.model_validate_json(evacuation.model_dump_json()) == evacuation
    assert EvacuationSpec.model_validate(evacuation.model_dump(mode="json")) == evacuation
    child = evacuation.child("web", "kvm2", active=True, persistent=True, local_disks=True)
    assert child.copy_storage is not None and child.undefine_source


def test_every_request_field_has_its_option() -> None:
    models = (MigrationSpec, DrainOptions, EvacuationSpec, EvacuationRequest)
    fields = {name for model in models for name in model.model_fields}
    fields |= {f"compression.{name}" for name in CompressionOptions.model_fields}
    assert sorted(fields - OPTION_FLAGS.keys()) == []


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (MigrationSpec, MIGRATION | {"src": ""}, "invalid --from ''"),
        (MigrationSpec, MIGRATION | {"dst": "-x"}, "invalid --to '-x'"),
        (MigrationSpec, MIGRATION | {"domain": "a/b"}, "invalid domain 'a/b'"),
        (MigrationSpec, MIGRATION | {"bandwidth_mib": 0}, "--bandwidth 0: Input should be"),
        (
            MigrationSpec,
            MIGRATION | {"completion_timeout_s": 0},
            "--completion-timeout 0: Input should be",
        ),
        (
            MigrationSpec,
            MIGRATION | {"copy_storage": "all", "migrate_disks": ["vda", ""]},
            "invalid --migrate-disks ''",
        ),
        (
            MigrationSpec,
            MIGRATION | {"compression": {"methods": [""]}},
            "--comp-methods '': Input should be",
        ),
        (
            MigrationSpec,
            MIGRATION | {"compression": {"methods": ["mt"], "mt_level": 99}},
            "--comp-mt-level 99: Input should be",
        ),
        (MigrationSpec, MIGRATION | {"listen_address": "a b"}, "--listen-address: not an IP"),
        (EvacuationSpec, EVACUATION | {"max_parallel": 0}, "--max-parallel 0: Input should be"),
        (EvacuationSpec, EVACUATION | {"to": ["kvm2", ""]}, "invalid --to ''"),
        (EvacuationSpec, {"host": "a b"}, "invalid host 'a b'"),
    ],
)
def test_a_refusal_names_the_option_typed(
    model: type[BaseModel], values: dict[str, Any], message: str
) -> None:
    said = refusal(model, values)
    assert said.startswith(message), said
    assert "_" not in said.split(":")[0], said  # no field name where the option goes


@pytest.mark.parametrize(
    "values",
    [
        MIGRATION | {"domain": LONG},
        MIGRATION | {"dname": LONG},
        MIGRATION | {"src": LONG},
        MIGRATION | {"policy": LONG},
        MIGRATION | {"copy_storage": "all", "migrate_disks": [LONG]},
        MIGRATION | {"compression": {"methods": [LONG]}},
        MIGRATION | {"timeout_action": LONG, "completion_timeout_s": 5},
        MIGRATION | {"live": LONG},
        MIGRATION | {"bandwidth_mib": 10**5000},
        MIGRATION | {"bandwidth_mib": 10.0**300},
    ],
)
def test_a_refusal_quotes_at_most_a_line_of_the_value(values: dict[str, Any]) -> None:
    said = refusal(MigrationSpec, values)
    assert len(said) < 300 and "\n" not in said, said[:500]


@pytest.fixture
def settings(config: Path) -> Any:
    return load_settings(config)


LIVE = MIGRATION | {"live": True}


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        ({"listen_address": "192.0.2.2"}, True),  # kvm2's migration_address
        ({"listen_address": "::ffff:192.0.2.2"}, True),  # the same address
        ({"listen_address": "192.0.2.2", "migrate_uri": "tcp://192.0.2.2:49200"}, True),
        ({"listen_address": "10.213.18.9"}, False),  # not the destination's
        ({"listen_address": "192.0.2.1"}, False),  # the source's
        ({"listen_address": "kvm2"}, False),  # a name the destination would resolve
        ({"listen_address": "0.0.0.0"}, False),  # a wildcard: leave the option out
        ({"listen_address": "::"}, False),
    ],
)
def test_the_listen_address_is_where_the_source_connects(
    settings: Any, values: dict[str, Any], allowed: bool
) -> None:
    if allowed:
        assert migration_spec(settings, LIVE | values).listen_address == values["listen_address"]
        return
    with pytest.raises(SubmitError) as caught:
        migration_spec(settings, LIVE | values)
    said = str(caught.value)
    assert said.startswith(f"--listen-address {values['listen_address']!r}: "), said
    assert "kvm2 at 192.0.2.2" in said


def drover(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_drover(config, *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["migrate", "idle-1", "--from", "", "--to", "kvm2"], "drover: invalid --from ''"),
        (
            ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--bandwidth", "0"],
            "drover: --bandwidth 0: Input should be greater than or equal to 1",
        ),
        (
            ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--completion-timeout", "0"],
            "drover: --completion-timeout 0: Input should be greater than or equal to 1",
        ),
        (
            [*MIGRATE, "--copy-storage", "all", "--migrate-disks", "vda,"],
            "drover: invalid --migrate-disks ''",
        ),
        (
            ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--comp-methods", ""],
            "drover: --comp-methods '': Input should be",
        ),
        (["evacuate", "kvm1", "--max-parallel", "0"], "drover: --max-parallel 0: Input should be"),
        (
            [*MIGRATE, "--live", "--listen-address", "10.213.18.9", "--dry-run"],
            "drover: --listen-address '10.213.18.9': the source connects to kvm2 at 192.0.2.2",
        ),
        (
            ["migrate", LONG, "--from", "kvm1", "--to", "kvm2"],
            f"drover: invalid domain {'x' * 80!r}... (100000 characters)",
        ),
    ],
)
def test_the_cli_says_what_was_typed_in_one_short_line(
    config: Path, redis_srv: RedisServer, args: list[str], message: str
) -> None:
    result = drover(config, *args)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [message] or result.stderr.startswith(message), (
        result.stderr[:500]
    )
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 300, result.stderr[:500]
    assert redis.Redis.from_url(redis_srv.url).keys("*") == []
