"""A worker's metrics: its real events through its real chain, read back as Prometheus would.

Every test emits events as the worker does (structlog, with a phase's job context bound, onto
a real Redis stream) through the chain `events.configure` builds with the metrics observer,
then scrapes the worker's own registry in the text exposition format and parses it with
prometheus_client's parser: the series an operator sees, with their labels and figures.
"""

from __future__ import annotations

import io
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config import events
from config.settings_model import Host, HostLimits
from jobs.keys import inbound_gate, outbound_gate
from jobs.maintenance import Maintenance
from jobs.model import Job
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, now
from lab.proc import wait_until
from tests.conftest import free_port
from tests.support.registry import REGISTRY
from worker.job_end import ended_fields, job_context
from worker.metrics_exporter import host_snapshot, serve, start_exporter
from worker.metrics_host import HostCollector, HostSnapshot
from worker.metrics_registry import WorkerMetrics
from worker.progress import Progress
from worker.runtime import Runtime

HOST = "kvm1"
STALE_AFTER_S = 600.0
UNIQUE_MTIME = 1_500_000_015.0  # no other test's config file has this mtime
PAGE = 4096
# A sample of libvirt's job statistics in pre-copy, as the monitor reads them.
STATS = {
    "time_elapsed": 4200,
    "data_total": 1_073_741_824,
    "data_processed": 402_653_184,
    "data_remaining": 671_088_640,
    "memory_bps": 8_388_608,
    "memory_dirty_rate": 2500,
    "memory_iteration": 3,
    "downtime": 300,
    "memory_page_size": PAGE,
}
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def chain(store: JobStore) -> Iterator[tuple[WorkerMetrics, io.StringIO]]:
    """The worker's chain (config/events.py) with its metrics observer; restored after."""
    old = structlog.get_config()
    out = io.StringIO()
    metrics = WorkerMetrics(HOST, STALE_AFTER_S)
    events.configure(HOST, store.without_retry, stream=out, observers=[metrics.observe])
    try:
        yield metrics, out
    finally:
        structlog.configure(**old)


def scrape(registry: CollectorRegistry) -> Series:
    text = generate_latest(registry).decode()
    return parse(text)


def parse(text: str) -> Series:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def find(series: Series, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {k: v for (n, k), v in series.items() if n == name and want <= k}


def job(domain: str = "dirty-1", **spec: Any) -> Job:
    moment = now()
    return Job(
        id=f"j-metrics-{domain}",
        state=JobState.MIGRATING,
        created=moment - timedelta(seconds=30),
        updated=moment,
        admitted=moment - timedelta(seconds=20),
        spec=MigrationSpec(domain=domain, src=HOST, dst="kvm2", **spec),
    )


def emit(j: Job, phase: str | None, name: str, **fields: Any) -> None:
    """`name` as a phase of `j` emits it: the job's context bound, as the phase frame does."""
    with structlog.contextvars.bound_contextvars(**job_context(j, phase)):
        events.get_logger().info(name, **fields)


def progress(j: Job, stage: str = "transfer", **stats: Any) -> None:
    sample = Progress.from_stats({**STATS, **stats}, stage)  # type: ignore[arg-type]
    emit(j, "perform", "migration.progress", **sample.as_event_fields())


IN_FLIGHT = {
    "job": "j-metrics-dirty-1",
    "domain": "dirty-1",
    "src": HOST,
    "dst": "kvm2",
    "mode": "p2p-native",
    "host": HOST,
}


def test_a_migration_in_flight_shows_its_figures_and_they_go_when_it_ends(
    chain: tuple[WorkerMetrics, io.StringIO], store: JobStore
) -> None:
    metrics, _ = chain
    j = job()
    emit(j, "perform", "phase.started")
    progress(j)
    series = scrape(metrics.registry)
    figures = {
        "drover_migration_data_total_bytes": 1_073_741_824,
        "drover_migration_data_processed_bytes": 402_653_184,
        "drover_migration_data_remaining_bytes": 671_088_640,
        "drover_migration_transfer_rate_bytes_per_second": 8_388_608,
        "drover_migration_dirty_rate_bytes_per_second": 2500 * PAGE,
        "drover_migration_iteration": 3,
        "drover_migration_expected_downtime_seconds": 0.3,
    }
    for name, value in figures.items():
        assert find(series, name) == {frozenset(IN_FLIGHT.items()): value}, name
    (stage_labels,) = find(series, "drover_migration_stage_seconds")
    assert dict(stage_labels) == {**IN_FLIGHT, "stage": "transfer"}
    (stamp,) = find(series, "drover_migration_last_progress_timestamp_seconds").values()
    assert abs(stamp - now().timestamp()) < STALE_AFTER_S
    # The stream's copy carries the mode the series are labelled with.
    *_, (_, on_stream) = store.read_events(j.id)
    assert on_stream["migration_mode"] == "p2p-native"

    emit(j, "perform", "migration.completed", migration_ms=5100, downtime_ms=42, mode="precopy")
    emit(j, "perform", "phase.finished", duration_ms=5300.0)
    emit(j, "confirm", "job.state", state="succeeded", previous="finishing", **ended_fields(j))

    series = scrape(metrics.registry)
    assert not [k for k in series if k[0].startswith("drover_migration_data")]
    assert not find(series, "drover_migration_stage_seconds")
    ended = {"host": HOST, "mode": "p2p-native", "outcome": "succeeded"}
    assert find(series, "drover_migrations_total", **ended) == {frozenset(ended.items()): 1}
    assert list(find(series, "drover_migration_duration_seconds_count", **ended).values()) == [1]
    (took,) = find(series, "drover_migration_duration_seconds_sum", **ended).values()
    assert took >= 20  # since its admission
    downtime = find(series, "drover_migration_downtime_seconds_sum", mode="p2p-native")
    assert list(downtime.values()) == [0.042]
    phase = find(series, "drover_phase_duration_seconds_sum", phase="perform", outcome="finished")
    assert list(phase.values()) == [5.3]


def test_a_job_ended_mid_transfer_loses_its_series_and_counts_once(
    chain: tuple[WorkerMetrics, io.StringIO],
) -> None:
    metrics, _ = chain
    j = job(domain="busy-2", control="direct")
    progress(j)
    assert find(
        scrape(metrics.registry), "drover_migration_data_remaining_bytes", mode="direct-native"
    )
    emit(j, "perform", "phase.failed", reason="cancelled by an operator")
    emit(j, "perform", "job.state", state="cancelled", reason="aborted", **ended_fields(j))
    series = scrape(metrics.registry)
    assert not find(series, "drover_migration_data_remaining_bytes")
    cancelled = find(series, "drover_migrations_total", mode="direct-native", outcome="cancelled")
    assert list(cancelled.values()) == [1]
    # A failed phase has no duration in its event: timed from its start when seen, else not.
    assert not find(series, "drover_phase_duration_seconds_count", outcome="failed")


def test_a_failed_phase_is_timed_from_its_start(chain: tuple[WorkerMetrics, io.StringIO]) -> None:
    metrics, _ = chain
    j = job()
    emit(j, "destination_prepare", "phase.started")
    emit(j, "destination_prepare", "phase.failed", reason="no room")
    count = find(
        scrape(metrics.registry),
        "drover_phase_duration_seconds_count",
        phase="destination_prepare",
        outcome="failed",
    )
    assert list(count.values()) == [1]


def test_a_new_stage_replaces_the_old_stage_series(
    chain: tuple[WorkerMetrics, io.StringIO],
) -> None:
    metrics, _ = chain
    j = job(postcopy=True)
    progress(j, "setup")
    progress(j, "transfer")
    progress(j, "postcopy")
    stages = find(scrape(metrics.registry), "drover_migration_stage_seconds")
    assert [dict(k)["stage"] for k in stages] == ["postcopy"]


def test_series_of_a_job_whose_end_this_worker_never_saw_are_dropped_when_stale(
    store: JobStore,
) -> None:
    old = structlog.get_config()
    metrics = WorkerMetrics(HOST, stale_after=0.05)
    events.configure(HOST, store.without_retry, stream=io.StringIO(), observers=[metrics.observe])
    try:
        progress(job())
        wait_until(
            lambda: not find(scrape(metrics.registry), "drover_migration_data_remaining_bytes"),
            5.0,
            "the stale series to go",
        )
    finally:
        structlog.configure(**old)


def test_policy_recovery_and_refusal_events_are_counted(
    chain: tuple[WorkerMetrics, io.StringIO],
) -> None:
    metrics, out = chain
    j = job()
    emit(j, "perform", "policy.step", action="raise_downtime", by="policy", done=True)
    emit(j, "perform", "policy.step", action="postcopy", by="policy", done=False, error="no")
    emit(j, "perform", "policy.step", action="tune", by="operator")
    emit(j, "perform", "phase.recovering", reason="lost worker")
    emit(j, "perform", "migration.reattached")
    emit(j, "perform", "phase.duplicate", reason="already ran")
    events.get_logger().warning("message.rejected", reason="malformed job id")  # no job
    emit(j, None, "security.rejected", reason="bad signature")
    series = scrape(metrics.registry)
    actions = {dict(k)["action"]: v for k, v in find(series, "drover_policy_actions_total").items()}
    assert actions == {"raise_downtime": 1, "tune": 1}
    kinds = {dict(k)["kind"]: v for k, v in find(series, "drover_recoveries_total").items()}
    assert kinds == {"phase.recovering": 1, "migration.reattached": 1}
    refused = {
        dict(k)["reason"]: v for k, v in find(series, "drover_messages_refused_total").items()
    }
    assert refused == {"phase.duplicate": 1, "message.rejected": 1, "security.rejected": 1}
    assert all(dict(k)["host"] == HOST for k in find(series, "drover_messages_refused_total"))
    assert len(out.getvalue().splitlines()) == 8  # every event still reached the log


def test_an_event_with_odd_figures_still_reaches_its_stream(
    chain: tuple[WorkerMetrics, io.StringIO], store: JobStore
) -> None:
    metrics, _ = chain
    j = job()
    emit(j, "perform", "migration.progress", stage="transfer", data_remaining="lots")
    emit(j, "perform", "job.state", state="failed", duration_s="long")
    assert [e["event"] for _, e in store.read_events(j.id)] == ["migration.progress", "job.state"]
    series = scrape(metrics.registry)
    assert list(find(series, "drover_migrations_total", outcome="failed").values()) == [1]
    assert not find(series, "drover_migration_duration_seconds_count", outcome="failed")
    assert metrics.errors == 0


def test_host_gauges_come_from_the_report_tick_snapshot(store: JobStore) -> None:
    store.r.sadd(outbound_gate(HOST), "j-a", "j-b")
    store.r.sadd(inbound_gate(HOST), "j-c")
    Maintenance(store.r).disable(HOST, "firmware", by="test")
    report: dict[str, object] = {"free_mib": 2048, "running": ["a", "b", "c"]}
    snap = host_snapshot(store.r, HOST, HostLimits(max_outbound=3, max_inbound=4), report)
    metrics = WorkerMetrics(HOST, STALE_AFTER_S)
    latest: list[HostSnapshot | None] = [None]
    metrics.registry.register(HostCollector(HOST, lambda: latest[0]))
    before = scrape(metrics.registry)
    assert find(before, "drover_worker_up") == {frozenset({("host", HOST)}): 1}
    assert not find(before, "drover_host_free_memory_bytes")  # no tick yet: nothing made up

    latest[0] = snap
    series = scrape(metrics.registry)
    one = {frozenset({("host", HOST)})}
    assert set(find(series, "drover_host_maintenance").items()) == {(k, 1) for k in one}
    assert list(find(series, "drover_host_free_memory_bytes").values()) == [2048 * 1024 * 1024]
    assert list(find(series, "drover_host_running_guests").values()) == [3]
    assert list(find(series, "drover_host_libvirtd_up").values()) == [1]
    held = {dict(k)["direction"]: v for k, v in find(series, "drover_host_slots_held").items()}
    limit = {dict(k)["direction"]: v for k, v in find(series, "drover_host_slots_limit").items()}
    assert (held, limit) == ({"out": 2, "in": 1}, {"out": 3, "in": 4})

    latest[0] = host_snapshot(store.r, HOST, HostLimits(), {"error": "libvirtd is gone"})
    series = scrape(metrics.registry)
    assert list(find(series, "drover_host_libvirtd_up").values()) == [0]
    assert not find(series, "drover_host_running_guests")


def registry_host(port: int, **fields: Any) -> Host:
    return Host(
        name=HOST,
        peer_uri="qemu+tcp://192.0.2.1/system",
        migration_address="192.0.2.1",
        metrics_port=port,
        **fields,
    )


def test_the_exporter_serves_the_worker_registry_over_http(
    chain: tuple[WorkerMetrics, io.StringIO],
) -> None:
    metrics, out = chain
    progress(job())
    port = free_port()
    server = serve(metrics.registry, registry_host(port))
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            series = parse(resp.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert find(series, "drover_migration_data_remaining_bytes", **IN_FLIGHT)
    listening = json.loads(out.getvalue().splitlines()[-1])
    assert (listening["event"], listening["port"]) == ("metrics.listening", port)
    # Only drover's series: the registry is the worker's, not the process-wide one.
    assert all(name.startswith("drover_") for name, _ in series)


def test_a_port_taken_leaves_the_worker_running_and_says_why(
    chain: tuple[WorkerMetrics, io.StringIO],
) -> None:
    metrics, out = chain
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(metrics.registry, registry_host(port)) is None
    said = json.loads(out.getvalue().splitlines()[-1])
    assert (said["event"], said["port"], said["level"]) == ("metrics.unavailable", port, "error")
    assert "in use" in said["error"]
    assert serve(metrics.registry, registry_host(0)) is None  # port 0: no exporter, by choice


def test_a_worker_takes_its_port_once_the_worker_it_replaces_lets_go(
    chain: tuple[WorkerMetrics, io.StringIO],
    store: JobStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker started while the draining one it replaces still holds the port: no exporter
    yet, said once; the keeper's `metrics` duty takes the port as soon as it is free."""
    metrics, out = chain
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    config = tmp_path / "drover.toml"
    config.write_text(
        REGISTRY.format(url="redis://127.0.0.1:1/0").replace(
            'migration_address = "192.0.2.1"',
            f'migration_address = "192.0.2.1"\nmetrics_port = {port}',
        )
    )
    os.utime(config, (UNIQUE_MTIME, UNIQUE_MTIME))  # the settings cache sees a new file
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    rt = Runtime(HOST, store, cast(Any, None), cast(Any, None), metrics=metrics)
    try:
        for _ in range(3):  # three ticks while the port is held
            start_exporter(rt)
        assert rt.metrics_server is None
        said = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
        assert said == ["metrics.unavailable"]
        held.close()
        start_exporter(rt)
        assert rt.metrics_server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert find(parse(resp.read().decode()), "drover_migration_iteration") == {}
        assert json.loads(out.getvalue().splitlines()[-1])["event"] == "metrics.listening"
    finally:
        held.close()
        if rt.metrics_server is not None:
            rt.metrics_server.shutdown()
            rt.metrics_server.server_close()
