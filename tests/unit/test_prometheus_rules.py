"""deploy/prometheus/ passes Prometheus's own checks, run by Debian's promtool as `make
check-rules` runs it: the rules and the config load, and the rules' unit tests pass.

The unit tests (alerts_test.yml) are held to cover every alert both firing and quiet, and to
bite: the same tests over a rule file with one expression broken fail.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.metrics import DEFAULT_METRICS_ADDRESS, DEFAULT_METRICS_PORT

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
# The registry docker-compose.yml mounts by default: the fleet prometheus.yml scrapes.
SHIPPED_REGISTRY = ROOT / "deploy" / "drover.toml"
# The scrape jobs the rules (and the dashboard) name.
SCRAPE_JOBS = {"drover-worker", "drover-exporter"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "Debian's prometheus package is needed for promtool (make deps installs it)"
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in load(RULES)["groups"] for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_with_its_rule_file_passes_promtool_check() -> None:
    result = promtool("check", "config", CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load(CONFIG)["rule_files"] == [RULES.name]


def test_config_scrapes_the_workers_and_the_exporter() -> None:
    jobs = {c["job_name"]: c for c in load(CONFIG)["scrape_configs"]}
    assert set(jobs) == SCRAPE_JOBS
    # The workers' own `host` and `job` labels (a job id) must survive the scrape as written.
    assert jobs["drover-worker"]["honor_labels"] is True
    ports = {
        name: {t.rsplit(":", 1)[1] for sc in job["static_configs"] for t in sc["targets"]}
        for name, job in jobs.items()
    }
    assert ports == {"drover-worker": {"9641"}, "drover-exporter": {"9640"}}


def test_config_scrapes_every_worker_of_the_shipped_registry() -> None:
    """One target per host of deploy/drover.toml, at its metrics address and port, labelled
    with its name: the two files are edited together."""
    (workers,) = [c for c in load(CONFIG)["scrape_configs"] if c["job_name"] == "drover-worker"]
    targets = {sc["labels"]["host"]: sc["targets"] for sc in workers["static_configs"]}
    hosts = tomllib.loads(SHIPPED_REGISTRY.read_text())["hosts"]
    assert targets == {
        name: [
            f"{host.get('metrics_address', DEFAULT_METRICS_ADDRESS)}"
            f":{host.get('metrics_port', DEFAULT_METRICS_PORT)}"
        ]
        for name, host in hosts.items()
    }


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = set(alert_rules())
    assert alerts == firing, "alerts never tested firing: " + ", ".join(alerts - firing)
    assert alerts == quiet, "alerts never tested quiet: " + ", ".join(alerts - quiet)


def test_every_alert_has_a_severity_and_says_what_to_do() -> None:
    for name, rule in alert_rules().items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize(
    ("alert", "broken"),
    [
        ("DroverWorkerDown", 'up{job="drover-worker"} == 1'),
        ("DroverJobStalled", 'max by (state) (drover_jobs{state="queued"}) > 0'),
    ],
)
def test_rule_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, broken: str) -> None:
    rules = load(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = broken
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr
