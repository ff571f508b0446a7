"""A worker's draining mark (`drover:worker:<host>:draining`) that no worker wrote: drover
reads it as "not draining" (unknown), so neither `drover hosts` nor a peer's recovery sweep
fails on it; `drover hosts --json` says the mark is unreadable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from config.settings import load_settings
from jobs.keys import draining_key, host_report_key
from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from producer.api import Drover
from producer.render import hosts_table, worker_cell
from tests.support.lab_fixtures import wait_for
from tests.unit.test_hostile_inputs import run_cli
from worker import recovery
from worker.runtime import Runtime

HOSTILE = [
    "{bad",
    "[1]",
    '{"running":5}',
    '"draining"',
    "[" * 100_000,  # deeper than Python's JSON reader goes
    json.dumps({"since": 5, "worker": "w", "running": [], "drain_timeout": 600.0}),
    json.dumps({"since": "x", "worker": "w", "running": [1], "drain_timeout": 600.0}),
    json.dumps({"since": "x", "worker": "w", "running": [], "drain_timeout": True}),
]
GOOD = {"since": "2026-12-01T10:00:00+00:00", "worker": "w@kvm2", "running": ["ab12"]}


@pytest.mark.parametrize("raw", HOSTILE)
def test_a_mark_no_worker_wrote_reads_as_not_draining(store: JobStore, raw: str) -> None:
    store.r.set(draining_key("kvm2"), raw)
    assert store.draining("kvm2") is None


def test_a_mark_a_worker_wrote_reads_back(store: JobStore) -> None:
    store.set_draining("kvm2", {**GOOD, "drain_timeout": 600.0}, 30)
    assert store.draining("kvm2") == {**GOOD, "drain_timeout": 600.0}
    store.set_draining("kvm2", {**GOOD, "drain_timeout": 600}, 30)  # a whole number too
    assert store.draining("kvm2") is not None


@pytest.mark.parametrize("raw", HOSTILE)
def test_drover_hosts_shows_the_mark_as_unreadable(
    config: Path, store: JobStore, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.r.set(draining_key("kvm2"), raw)
    rows = {r["host"]: r for r in Drover(load_settings(config)).hosts()}
    assert rows["kvm2"]["draining"] is None
    assert rows["kvm2"]["draining_unreadable"].startswith(f"{draining_key('kvm2')} is not a")
    assert len(rows["kvm2"]["draining_unreadable"]) < 200  # its start, not all of it
    assert rows["kvm1"]["draining_unreadable"] is None
    cell = worker_cell(rows["kvm2"])  # the table says so too, not only --json
    assert cell.startswith(f"DEAD; draining mark unreadable: {draining_key('kvm2')} is not a")
    hosts_table(list(rows.values()))
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    for argv in (["hosts"], ["hosts", "--json"]):
        code, out, err = run_cli(argv)
        assert (code, err) == (0, ""), err
    assert json.loads(out)[1]["draining_unreadable"]


@pytest.mark.parametrize("raw", ["{bad", "[1]", '"report"', "[" * 100_000])
def test_a_report_that_is_no_json_object_reads_as_none(store: JobStore, raw: str) -> None:
    store.r.set(host_report_key("kvm1"), raw)
    assert store.host_report("kvm1") == {}


def test_drover_hosts_shows_a_report_no_worker_wrote_as_it_is_or_unknown(
    config: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.r.set(host_report_key("kvm1"), json.dumps({"running": 5, "free_mib": "lots"}))
    store.r.set(host_report_key("kvm2"), json.dumps({"running": [1, None], "cpu": 5}))
    rows = {r["host"]: r for r in Drover(load_settings(config)).hosts()}
    assert rows["kvm1"]["running"] is None  # not a list: unknown
    assert rows["kvm1"]["free_mib"] == "lots"  # shown as it is (escaped by the table)
    assert rows["kvm2"]["running"] == ["1", "None"]  # shown as they are, as text
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    code, _, err = run_cli(["hosts"])
    assert (code, err) == (0, ""), err


@pytest.mark.parametrize("raw", ["{bad", "[1]", '{"running":5}'])
def test_a_peers_unreadable_mark_does_not_stop_the_recovery_sweep(
    config: Path, store: JobStore, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kvm2's worker is down and its mark unreadable: kvm1's sweep treats it as not seen and
    marks the job waiting on kvm2 stalled, as for any host without a worker."""
    config.write_text(config.read_text() + "\n[tunables]\nstall_after = 0.001\n")
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
    job_id = store.create(spec, host="cli")
    store.phase_started(job_id, Phase.SOURCE_PREFLIGHT.value, "kvm1")
    store.phase_ended(job_id, Phase.SOURCE_PREFLIGHT.value)
    store.phase_started(job_id, Phase.DESTINATION_PREPARE.value, "kvm2")  # kvm2's step
    store.r.set(draining_key("kvm2"), raw)
    rt = Runtime(host="kvm1", store=store, libvirt=cast(Any, None), ledger=cast(Any, None))
    with capture_logs() as logs:
        recovery.sweep(rt)  # the first look: kvm2 not seen since now
        assert store.get(job_id).state is not JobState.STALLED

        def stalled() -> bool:  # a later look, past stall_after by this process's clock too
            recovery.sweep(rt)
            return store.get(job_id).state is JobState.STALLED

        wait_for(stalled, 5, "the job to be marked stalled")
    assert [e for e in logs if e["event"] == "keeper.error"] == []
    job = store.get(job_id)
    assert job.state is JobState.STALLED
    assert job.reason is not None and "kvm2's worker has not been seen" in job.reason
