"""`[tunables]` and `[faults]` values that made drover hang, wait for ever or fail later are
refused when the config loads: one line naming the key. Every number finite, durations
bounded, pairs consistent, phase names real phases."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from config.tunables import PHASE_NAMES, RETRYABLE_PHASES
from jobs.phases import PHASE_NAMES as JOB_PHASE_NAMES
from jobs.phases import PHASE_ORDER, RULES
from tests.conftest import free_port
from tests.support.cli import run_drover
from tests.support.registry import REGISTRY


def loaded(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url="redis://127.0.0.1:6379/0") + extra)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "[tunables]\nproducer_redis_retry_for = inf\n",
            "producer_redis_retry_for: Input should be a finite number",
        ),
        (
            "[tunables]\nwait_redis_outage = inf\n",
            "wait_redis_outage: Input should be a finite number",
        ),
        ("[tunables]\nphase_timeout = inf\n", "phase_timeout: Input should be a finite number"),
        ("[tunables]\nphase_timeout = nan\n", "phase_timeout: Input should be a finite number"),
        (
            "[tunables]\nredis_retry_for = -inf\n",
            "redis_retry_for: Input should be a finite number",
        ),
        (
            "[tunables]\nmigration_timeout = 1e308\n",
            "migration_timeout: Input should be less than or equal to 604800",
        ),
        (
            "[tunables]\nwait_redis_outage = 1e9\n",
            "wait_redis_outage: Input should be less than or equal to 86400",
        ),
        (
            "[tunables]\nproducer_redis_retry_for = 1e6\n",
            "producer_redis_retry_for: Input should be less than or equal to 600",
        ),
        (
            "[tunables]\nheartbeat_interval = 30\nheartbeat_ttl = 1\n",
            "tunables: heartbeat_interval must be shorter than heartbeat_ttl",
        ),
        (
            "[tunables]\nheartbeat_interval = 20\nheartbeat_ttl = 60\n",
            "tunables: heartbeat_interval must be shorter than host_facts_ttl",
        ),
        (
            "[tunables]\npostcopy_resume_delay = 30\n",
            "postcopy_resume_delay must not exceed postcopy_resume_max_delay",
        ),
        ("[tunables]\nphase_retries = {perfrom = 3}\n", "phase_retries: 'perfrom' is not a phase"),
        (
            "[tunables]\nphase_retries = {perform = 3}\n",
            "phase_retries: 'perform' is never tried again",
        ),
        (
            "[tunables]\nphase_retries = {finish = -1}\n",
            "phase_retries.finish: Input should be greater than or equal to 0",
        ),
        (
            "[faults]\nphase_delays = {perform = -5.0}\n",
            "phase_delays.perform: Input should be greater than or equal to 0",
        ),
        (
            "[faults]\nphase_delays = {perform = inf}\n",
            "phase_delays.perform: Input should be a finite number",
        ),
        ("[faults]\nphase_delays = {prepare = 5.0}\n", "phase_delays: 'prepare' is not a phase"),
    ],
)
def test_a_tunable_that_means_never_or_nothing_is_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(loaded(tmp_path, extra))
    said = str(caught.value)
    assert message in said and "\n" not in said, said


def test_sensible_values_still_load(tmp_path: Path) -> None:
    settings = load_settings(
        loaded(
            tmp_path,
            "[tunables]\nheartbeat_interval = 1\nheartbeat_ttl = 3\nphase_retries = {finish = 0}\n"
            "migration_timeout = 86400\n[faults]\nphase_delays = {perform = 5, confirm = 0}\n",
        )
    )
    assert settings.tunables.phase_retries == {"finish": 0}
    assert settings.faults.phase_delays == {"perform": 5.0, "confirm": 0.0}


def test_the_configs_phase_names_are_the_jobs_phases() -> None:
    """The config layer cannot import jobs/phases.py: its own names are held equal here."""
    assert tuple(phase.value for phase in PHASE_ORDER) == PHASE_NAMES
    assert frozenset(PHASE_NAMES) == JOB_PHASE_NAMES
    assert tuple(p.value for p in PHASE_ORDER if RULES[p].retryable) == RETRYABLE_PHASES


def test_an_infinite_producer_retry_no_longer_hangs_drover_jobs(tmp_path: Path) -> None:
    """It made `drover jobs` against a Redis that does not answer retry for ever."""
    path = tmp_path / "drover.toml"
    url = f"redis://:x@127.0.0.1:{free_port()}/0"
    path.write_text(REGISTRY.format(url=url) + "[tunables]\nproducer_redis_retry_for = inf\n")
    result = run_drover(path, "jobs")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "producer_redis_retry_for: Input should be a finite" in lines[0]
