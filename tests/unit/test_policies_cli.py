"""Policies at the command line: `drover migrate|evacuate|schedule add --policy`, `drover
policies [NAME] [--json]` and the effective policy in `drover job ID`.

A refusal is one line on stderr, a non-zero exit, no traceback, and nothing in Redis.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from config.settings import load_settings
from jobs.policy_choice import effective_policy
from jobs.store import JobStore
from tests.conftest import RedisServer
from tests.unit.test_cli_errors import drover, queued_anything

POLICIES = """
[policies.fast]
bandwidth_mib = 500

[policies.zip]
compression = "zstd"
"""
MIGRATE = ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live"]


@pytest.fixture
def fleet(config: Path) -> Path:
    config.write_text(config.read_text() + POLICIES)
    return config


def refused(result: object, message: str) -> None:
    stderr, stdout = result.stderr, result.stdout  # type: ignore[attr-defined]
    assert result.returncode == 2, (stdout, stderr)  # type: ignore[attr-defined]
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "nope"], "drover: unknown policy 'nope' (known policies: default, fast"),
        (["--policy", "Bad"], "invalid --policy 'Bad'"),
        (["--policy", "zip"], "policy zip: compression zstd needs parallel_connections >= 2"),
        (
            ["--policy", "no-postcopy", "--postcopy-bandwidth", "5"],
            "--postcopy-bandwidth needs post-copy, which is off (--policy: policy no-postcopy",
        ),
        (["--postcopy-bandwidth", "0"], "--postcopy-bandwidth"),
        (["--tunnelled", "--postcopy-bandwidth", "5"], "--postcopy-bandwidth cannot be tunnelled"),
        (
            ["--dest-connection", "--postcopy-bandwidth", "5"],
            "--postcopy-bandwidth cannot go through virDomainMigrate2",
        ),
    ],
)
def test_migrate_refuses_bad_policies(
    fleet: Path, redis_srv: RedisServer, args: list[str], message: str
) -> None:
    refused(drover(fleet, *MIGRATE, *args), message)
    assert not queued_anything(redis_srv)


def test_migrate_records_the_policy_and_the_postcopy_bandwidth(fleet: Path) -> None:
    result = drover(fleet, *MIGRATE, "--policy", "fast", "--postcopy-bandwidth", "3", "--json")
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    job = JobStore.from_url(load_settings(fleet).redis_url).get(job_id)
    assert job.spec.policy == "fast" and job.spec.postcopy_bandwidth_mib == 3


def test_a_host_with_an_unknown_policy_is_a_one_line_config_error(config: Path) -> None:
    config.write_text(config.read_text().replace("[hosts.kvm2]", '[hosts.kvm2]\npolicy = "x"'))
    result = drover(config, "policies")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("host kvm2: unknown policy 'x'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_evacuate_and_schedule_refuse_an_unknown_policy(
    fleet: Path, redis_srv: RedisServer
) -> None:
    refused(drover(fleet, "evacuate", "kvm1", "--policy", "nope"), "unknown policy 'nope'")
    refused(drover(fleet, "evacuate", "kvm1", "--policy", "zip"), "compression zstd needs")
    add = ["schedule", "add", "evacuate", "kvm1", "--cron", "0 3 * * *"]
    refused(drover(fleet, *add, "--policy", "nope"), "unknown policy 'nope'")
    assert not queued_anything(redis_srv)
    added = drover(fleet, *add, "--policy", "fast", "--json")
    assert added.returncode == 0, added.stderr
    summary = json.loads(added.stdout)
    assert summary["request"]["policy"] == "fast" and summary["what"].endswith(", policy fast")


def test_drover_policies_lists_shipped_and_configured(fleet: Path) -> None:
    listed = json.loads(drover(fleet, "policies", "--json").stdout)
    by_name = {p["name"]: p for p in listed}
    assert sorted(by_name) == ["default", "fast", "manual", "no-postcopy", "zip"]
    assert by_name["fast"]["defined_in"] == "drover.toml"
    assert by_name["manual"]["defined_in"] == "shipped"
    assert by_name["fast"]["values"]["bandwidth_mib"] == 500
    assert by_name["zip"]["problems"] == ["compression zstd needs parallel_connections >= 2"]
    table = drover(fleet, "policies")
    assert table.returncode == 0
    assert "fast (drover.toml)" in table.stdout and "no-postcopy (shipped)" in table.stdout
    assert "policy zip cannot be used: compression zstd" in table.stdout


def test_drover_policies_name_says_where_each_value_comes_from(fleet: Path) -> None:
    one = json.loads(drover(fleet, "policies", "fast", "--json").stdout)
    assert one["sources"]["bandwidth_mib"] == "drover.toml"
    assert one["sources"]["allow_postcopy"] == "default (shipped)"
    shown = drover(fleet, "policies", "fast")
    assert shown.returncode == 0 and "policy fast (drover.toml)" in shown.stdout
    line = next(
        x for x in shown.stdout.splitlines() if "bandwidth_mib" in x and "postcopy" not in x
    )
    assert "500" in line and "drover.toml" in line
    refused(drover(fleet, "policies", "nope"), "unknown policy 'nope' (known policies:")


def test_drover_job_shows_the_recorded_policy_and_its_sources(fleet: Path) -> None:
    result = drover(fleet, *MIGRATE, "--policy", "fast", "--bandwidth", "9", "--json")
    job_id = json.loads(result.stdout)["job_id"]
    settings = load_settings(fleet)
    store = JobStore.from_url(settings.redis_url)
    # What the source worker's perform records (worker/policy_source.py).
    store.update(job_id, policy=effective_policy(settings, store.get(job_id).spec, None))
    data = json.loads(drover(fleet, "job", job_id, "--json").stdout)
    assert data["policy"]["name"] == "fast"
    assert data["policy"]["values"]["bandwidth_mib"] == 9
    assert data["policy"]["sources"]["bandwidth_mib"] == "flag --bandwidth"
    assert data["policy"]["sources"]["allow_postcopy"] == "default (shipped)"
    shown = drover(fleet, "job", job_id)
    assert shown.returncode == 0 and "effective policy fast" in shown.stdout
    assert "flag --bandwidth" in shown.stdout and "default (shipped)" in shown.stdout
    redis.Redis.from_url(settings.redis_url).flushdb()
