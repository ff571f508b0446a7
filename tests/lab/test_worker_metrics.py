"""Each lab worker's /metrics, scraped over HTTP from the root namespace as Prometheus would,
while dirty-1 migrates under a bandwidth cap and after it lands.

dirty-1 stays in pre-copy under `policy="manual"` and a small cap until `force-complete`
pauses it to finish; meanwhile the source's exporter shows the migration in flight (data
remaining above zero, a dirty rate); once it succeeded its series are gone and the outcome
counter has risen by one.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.metrics import metrics_targets
from tests.support.lab_fixtures import JOB_TIMEOUT_S, Lab, wait_for

pytestmark = pytest.mark.lab

DIRTY = "dirty-1"
SLOW_MIB = 8  # far below dirty-1's dirty rate: pre-copy never ends on its own
START_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 5.0
SUCCEEDED = {"mode": "p2p-native", "outcome": "succeeded"}
Samples = list[tuple[str, dict[str, str], float]]


def scrape(target: str) -> Samples:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=SCRAPE_TIMEOUT_S) as resp:
        text = resp.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def values(samples: Samples, name: str, **labels: str) -> list[float]:
    return [v for n, got, v in samples if n == name and labels.items() <= got.items()]


def succeeded_count(targets: dict[str, str]) -> float:
    """Jobs that ended succeeded in p2p-native mode, over every host's exporter."""
    return sum(
        sum(values(scrape(t), "drover_migrations_total", **SUCCEEDED)) for t in targets.values()
    )


@pytest.fixture
def homecoming(lab: Lab, dirty_running: None) -> Iterator[None]:
    yield
    if lab.running_on(DIRTY) == ["lab2"]:  # home while it runs: auto-converge lands it
        home = lab.migrate(DIRTY, "lab2", "lab1", auto_converge=True, bandwidth_mib=128)
        assert home.state.value == "succeeded", home.reason


def test_a_throttled_migration_is_seen_in_flight_and_counted_once_it_lands(
    lab: Lab, homecoming: None
) -> None:
    targets = metrics_targets()
    assert sorted(targets) == lab.hosts()
    source = targets["lab1"]
    assert values(scrape(source), "drover_worker_up", host="lab1") == [1]
    before = succeeded_count(targets)

    job_id = lab.drover.submit(
        domain=DIRTY, src="lab1", dst="lab2", live=True, policy="manual", bandwidth_mib=SLOW_MIB
    )
    ours = {"job": job_id, "domain": DIRTY, "src": "lab1", "dst": "lab2", "host": "lab1"}

    def in_flight() -> bool:
        samples = scrape(source)
        remaining = values(samples, "drover_migration_data_remaining_bytes", **ours)
        dirty = values(samples, "drover_migration_dirty_rate_bytes_per_second", **ours)
        return bool(remaining and remaining[0] > 0 and dirty and dirty[0] > 0)

    try:
        wait_for(in_flight, START_TIMEOUT_S, f"job {job_id} in flight on lab1's /metrics")
        samples = scrape(source)
        assert values(samples, "drover_migration_transfer_rate_bytes_per_second", **ours)
        (stage,) = [got["stage"] for n, got, _ in samples if n.endswith("stage_seconds")]
        assert stage == "transfer"
        assert all(got.get("mode") == "p2p-native" for n, got, _ in samples if "job" in got)
        lab.drover.force_complete(job_id)  # manual: the guest pauses, the rest is copied
        job = lab.drover.wait(job_id, JOB_TIMEOUT_S)
    finally:
        if not lab.drover.job(job_id).terminal:
            lab.drover.abort(job_id)
            lab.drover.wait(job_id, JOB_TIMEOUT_S)
    assert job.state.value == "succeeded", job.reason

    after = scrape(source)
    assert not [n for n, got, _ in after if got.get("job") == job_id], "in-flight series left"
    assert succeeded_count(targets) == before + 1
    assert sum(values(after, "drover_migration_downtime_seconds_count", mode="p2p-native")) >= 1
