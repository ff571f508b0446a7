"""A forged `admitted` field starts nothing: a phase runs, and recovery sends one again, only
for a job holding its slot in every gate (the probe: `HSET drover:job:<id> admitted <then>`
on a job waiting for a full gate ran it to `succeeded` past the gate). Admitted jobs keep
running when a limit is lowered under them, evacuation children run under --max-parallel,
dry runs take no slot, and a job whose field was forged still starts in its turn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from config.settings import Settings, load_settings
from jobs.admission import Admission, inbound_gate
from jobs.dry_run import record_dry_run
from jobs.keys import evacuation_gate, job_key
from jobs.model import Job
from jobs.phases import Phase
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.conftest import RedisServer
from worker import recovery
from worker.ledger import Ledger
from worker.phase_errors import Dropped
from worker.phase_frame import execute_phase
from worker.runtime import Runtime

REGISTRY = """
redis_url = "{url}"
[cluster]
max_migrations = 8
[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"
limits = {{ max_outbound = 2, max_inbound = 2 }}
[hosts.kvm2]
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
limits = {{ max_outbound = 2, max_inbound = {inbound} }}
"""
FAKE = "fa0000000001"  # what the probe wrote: a record that only says it is migrating
Ran = list[str]


@pytest.fixture
def rt(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Runtime:
    """kvm1's worker, on a registry where kvm2 takes one migration in at a time."""
    write_config(tmp_path, redis_srv, inbound=1)
    monkeypatch.setenv("DROVER_CONFIG", str(tmp_path / "drover.toml"))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return Runtime("kvm1", store, cast(Any, None), Ledger(str(tmp_path / "ledger")))


def write_config(tmp_path: Path, redis_srv: RedisServer, inbound: int) -> Settings:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url, inbound=inbound))
    return load_settings(path)


def submit(store: JobStore, domain: str, **kw: Any) -> str:
    return enqueue(store, MigrationSpec(domain=domain, src="kvm1", dst="kvm2"), origin="t", **kw)


def admit(rt: Runtime) -> list[str]:
    return Admission(rt.store).pass_(rt.settings, lambda job_id, spec: None)


def forge_admitted(store: JobStore, job_id: str) -> None:
    """The probe's write: admitted, and last moved, five minutes ago."""
    then = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    store.r.hset(job_key(job_id), mapping={"admitted": then, "updated": then})


def fill_inbound(store: JobStore) -> None:
    """kvm2's inbound gate (limit 1) held by a record that only says it migrates."""
    store.r.hset(job_key(FAKE), "state", "migrating")
    store.r.sadd(inbound_gate("kvm2"), FAKE)


def free_inbound(store: JobStore) -> None:
    """Its holder ends, and gives the slot back in the same step (jobs/transition.py)."""
    store.r.hset(job_key(FAKE), "state", "succeeded")
    store.r.srem(inbound_gate("kvm2"), FAKE)


def run_preflight(rt: Runtime, job_id: str) -> Ran:
    """The first phase's message, as the chain sends it; returns the jobs whose body ran."""
    ran: Ran = []

    def body(_rt: Runtime, job: Job) -> JobState | None:
        ran.append(job.id)
        return None

    with contextlib.suppress(Dropped):
        execute_phase(rt, job_id, Phase.SOURCE_PREFLIGHT, body)
    return ran


def rejections(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "message.rejected"]


def test_a_forged_admitted_field_starts_no_phase_and_the_job_starts_in_its_turn(
    rt: Runtime, store: JobStore
) -> None:
    fill_inbound(store)
    job_id = submit(store, "web01")
    assert admit(rt) == []
    assert store.get(job_id).waiting_for == "waiting for a slot: kvm2 inbound limit 1 reached"
    forge_admitted(store, job_id)
    with capture_logs() as logs:
        assert run_preflight(rt, job_id) == []
    assert rejections(logs) == [
        "job holds no slot in kvm1 outbound, kvm2 inbound, cluster-wide: admission never started it"
    ]
    job = store.get(job_id)
    assert job.state is JobState.QUEUED and not job.phases

    free_inbound(store)
    assert admit(rt) == [job_id]  # still in its line, admitted in its turn
    assert store.r.smembers(inbound_gate("kvm2")) == {job_id}
    assert run_preflight(rt, job_id) == [job_id]


def test_recovery_does_not_send_again_a_job_whose_admitted_field_was_forged(
    rt: Runtime, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    class Chain:
        def __init__(self, app: object, job_id: str, spec: object, start: Phase) -> None:
            sent.append(start.value)

        def apply_async(self) -> None:
            return None

    monkeypatch.setattr(recovery, "migration_chain", Chain)
    fill_inbound(store)
    job_id = submit(store, "web01")
    admit(rt)
    forge_admitted(store, job_id)
    with capture_logs() as logs:
        for _ in range(3):
            recovery.sweep(rt)
    assert sent == []
    assert rejections(logs) == [  # said once, not at every sweep
        "job holds no slot in kvm1 outbound, kvm2 inbound, cluster-wide: admission never "
        "started it; its phase is not sent again"
    ]
    assert not [e for e in logs if e["event"] == "phase.redispatched"]
    assert not store.get(job_id).phases

    # An admitted job whose first message was lost is still sent again.
    free_inbound(store)
    assert admit(rt) == [job_id]
    forge_admitted(store, job_id)  # its admission long ago: overdue
    recovery.sweep(rt)
    assert sent == [Phase.SOURCE_PREFLIGHT.value]


def children(store: JobStore) -> Iterator[str]:
    for domain in ("web01", "web02"):
        yield submit(store, domain, parent="ev0000000001", parent_limit=1)


def test_only_what_admission_never_started_is_refused(
    rt: Runtime, store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    """An evacuation's child without its --max-parallel slot is refused (its other gates'
    slots, written by hand, are not enough); one admitted runs, even once a limit it was
    admitted under is lowered; a dry run, which takes no slot, runs its checks."""
    write_config(tmp_path, redis_srv, inbound=2)
    first, second = children(store)
    assert admit(rt) == [first]  # --max-parallel 1
    forge_admitted(store, second)
    for gate in ("drover:slots:out:kvm1", inbound_gate("kvm2"), "drover:slots:cluster"):
        store.r.sadd(gate, second)  # every gate but its evacuation's
    write_config(tmp_path, redis_srv, inbound=1)  # two hold kvm2's slots, under a limit of 1
    assert rt.settings.host("kvm2").limits.max_inbound == 1
    spec = MigrationSpec(domain="web03", src="kvm1", dst="kvm2", dry_run=True)
    dry = record_dry_run(store, spec, origin="t", signer=None)
    with capture_logs() as logs:
        ran = [job for job in (first, second, dry) for job in run_preflight(rt, job)]
    assert ran == [first, dry]
    assert rejections(logs) == [
        "job holds no slot in evacuation ev0000000001: admission never started it"
    ]
    assert store.r.smembers(evacuation_gate("ev0000000001")) == {first}


def run_phase(rt: Runtime, job_id: str, phase: Phase) -> Ran:
    ran: Ran = []

    def body(_rt: Runtime, job: Job) -> JobState | None:
        ran.append(job.id)
        return None

    with contextlib.suppress(Dropped):
        execute_phase(rt, job_id, phase, body)
    return ran


def test_a_job_whose_slots_were_pruned_under_a_forged_end_goes_on_where_it_already_ran(
    rt: Runtime, store: JobStore
) -> None:
    """The probe: `HSET drover:job:J state succeeded` for two seconds while J migrated, and any
    admission in that time pruned J's slots; J's finish was then refused for ever ("admission
    never started it"), the job left `migrating` while libvirt showed the guest moved. A
    phase of a job that already ran a phase on this host (its ledger says so) goes on."""
    job_id = submit(store, "web01")
    assert admit(rt) == [job_id]
    assert run_preflight(rt, job_id) == [job_id]  # kvm1's ledger: it ran here
    store.r.hset(job_key(job_id), "state", "succeeded")  # the forger's two seconds
    other = submit(store, "web02")
    admit(rt)  # prunes the slots of a job whose record says it ended
    store.r.hset(job_key(job_id), "state", "migrating")  # and back
    assert job_id not in store.r.smembers(inbound_gate("kvm2"))
    with capture_logs() as logs:
        assert run_phase(rt, job_id, Phase.PERFORM) == [job_id]
    assert [e["event"] for e in logs if e["event"] in ("job.slots_lost", "message.rejected")] == [
        "job.slots_lost"
    ]
    assert job_id in store.r.smembers(inbound_gate("kvm2"))  # it runs: it counts again
    # A job that never ran here, without its slots, is still refused.
    store.r.srem(inbound_gate("kvm2"), other)
    with capture_logs() as logs:
        assert run_preflight(rt, other) == []
    assert rejections(logs) and "admission never started it" in rejections(logs)[0]
