"""An evacuation whose list of children is deleted (or rewritten) in Redis neither ends under a
child still running nor says a child that ran was never queued: each child is found by its own
record, through the domain's lease or the host's job index, put back, and said once. Against
the real test Redis and libvirt's `test:///default` driver (one hypervisor seen as every host,
as in tests/unit/test_libvirt_seam.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from structlog.testing import capture_logs

from config.celery import app
from config.settings import load_settings
from jobs.evacuation import EvacuationSpec, EvacuationStore, Placement
from jobs.evacuation_model import Children, Evacuation
from jobs.evacuations import EvacuationService
from jobs.keys import children_key, domain_lock_key, jobs_by_host_key
from jobs.spec import MigrationSpec
from jobs.states import EvacuationState, JobState
from jobs.store import JobStore
from worker.evacuation_watch import check
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost
from worker.runtime import Runtime

TEST_URI = "test:///default"
DOMAINS = {
    "gone-1": "00000000-0000-0000-0000-0000000000e1",
    "gone-2": "00000000-0000-0000-0000-0000000000e2",
}


@pytest.fixture
def rt(
    config: Path, monkeypatch: pytest.MonkeyPatch, store: JobStore, tmp_path: Path
) -> Iterator[Runtime]:
    """kvm1's worker, every libvirt URI opening the test hypervisor (which has neither
    planned guest: both are gone from kvm1, and kvm2 answers that it has neither)."""
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    seam = LibvirtHost(TEST_URI, opener=lambda _uri: libvirt.open(TEST_URI))
    yield Runtime("kvm1", store, seam, Ledger(str(tmp_path / "ledger")))


def placed(domain: str, uuid: str) -> Placement:
    return Placement(
        domain=domain,
        uuid=uuid,
        memory_mib=64,
        active=True,
        persistent=True,
        destination="kvm2",
        estimate_s=1.0,
    )


def running_evacuation(store: JobStore) -> tuple[str, dict[str, str]]:
    """kvm1's evacuation, running, its two children queued (by domain) and migrating, each
    holding its domain's lease as a queued child does."""
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(EvacuationSpec(host="kvm1", to=["kvm2"]), "test")
    evacuations.transition(ev_id, EvacuationState.PLANNING)
    evacuations.save_plan(ev_id, [placed(domain, uuid) for domain, uuid in DOMAINS.items()])
    evacuations.transition(ev_id, EvacuationState.RUNNING)
    children = {}
    for domain in DOMAINS:
        spec = MigrationSpec(domain=domain, src="kvm1", dst="kvm2", live=True)
        child = store.create(spec, host="kvm1", parent=ev_id)
        assert store.take_lease(domain_lock_key("name", domain), child) is None
        for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
            assert store.transition(child, state, host="kvm1")[0]
        children[domain] = child
    assert evacuations.get(ev_id).children == children
    return ev_id, children


def succeeded(store: JobStore, child: str) -> None:
    assert store.transition(child, JobState.FINISHING, host="kvm2")[0]
    assert store.transition(child, JobState.SUCCEEDED, host="kvm1")[0]
    store.release_leases(child)


def test_children_deleted_from_the_list_keep_the_evacuation_open_until_they_end(
    rt: Runtime, store: JobStore
) -> None:
    ev_id, children = running_evacuation(store)
    evacuations = EvacuationStore(store)
    store.r.delete(children_key(ev_id))
    # gone-1 is found only through its lease, gone-2 only through the host's job index
    store.r.zrem(jobs_by_host_key("kvm1"), children["gone-1"])
    store.r.delete(domain_lock_key("name", "gone-2"))

    with capture_logs() as logs:
        for _ in range(3):
            check(rt, ev_id)

    ev = evacuations.get(ev_id)
    assert ev.state is EvacuationState.RUNNING  # ended `partial` at once before
    assert ev.children == children  # put back
    refound = [e for e in logs if e["event"] == "evacuation.child_refound"]
    assert sorted((e["domain"], e["child"]) for e in refound) == sorted(children.items())

    # Again, with one child ended (its lease given back: found in the index once more).
    store.r.zadd(jobs_by_host_key("kvm1"), {children["gone-1"]: ev.created.timestamp()})
    store.r.delete(children_key(ev_id))
    succeeded(store, children["gone-1"])
    check(rt, ev_id)
    assert evacuations.get(ev_id).state is EvacuationState.RUNNING

    succeeded(store, children["gone-2"])
    store.r.delete(children_key(ev_id))
    check(rt, ev_id)
    ev = evacuations.get(ev_id)
    # The test hypervisor shows neither guest anywhere: not moved, and said so, never that
    # a child that ran was never queued.
    assert ev.state is EvacuationState.PARTIAL
    assert ev.reason is not None and "never queued" not in ev.reason
    assert {o.domain: o.job_id for o in ev.outcome} == children
    assert all(o.job_state == "succeeded" for o in ev.outcome)
    for child in children.values():
        assert f"job {child} succeeded" in ev.reason


def test_a_list_rewritten_to_name_another_job_is_not_believed(rt: Runtime, store: JobStore) -> None:
    """A child list naming a job that is not this evacuation's child of that domain (here an
    ended job of no evacuation) is looked past: the real, running child is found."""
    ev_id, children = running_evacuation(store)
    other = store.create(MigrationSpec(domain="gone-1", src="kvm1", dst="kvm2"), host="x")
    store.transition(other, JobState.FAILED, host="x", reason="x")
    store.r.hset(children_key(ev_id), mapping={"gone-1": other, "gone-2": other})

    check(rt, ev_id)

    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.RUNNING
    assert ev.children == children


def test_an_abort_while_the_worker_is_away_waits_for_children_missing_from_the_list(
    rt: Runtime, store: JobStore, config: Path
) -> None:
    """`drover evacuate --abort` with kvm1's worker away ends the evacuation itself once no
    child is live: a deleted list must not make it look childless (it was cancelled at once,
    its children still migrating and never asked to stop)."""
    ev_id, children = running_evacuation(store)
    store.r.delete(children_key(ev_id))
    sent: list[object] = []
    service = EvacuationService(load_settings(config), store, app, sent.append, None)

    said = service.abort(ev_id, by="test")

    assert "a child is still live while kvm1's worker is away" in said
    assert EvacuationStore(store).get(ev_id).state is EvacuationState.RUNNING
    assert all(store.get(child).abort_requested for child in children.values())


def test_an_abort_stops_and_counts_a_child_queued_while_it_listed_them(
    store: JobStore, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child the worker queues while `drover evacuate --abort` lists the children (here:
    missing from the first list) is stopped by the abort and counted in its line; it was
    left to the worker's own look, and the line said "1 of 1"."""
    ev_id, children = running_evacuation(store)
    service = EvacuationService(load_settings(config), store, app, lambda _m: None, None)
    real = service.records.find_children
    looks: list[str] = []

    def first_look_misses_gone_2(ev: Evacuation, genuine: object = None) -> Children:
        found = real(ev)
        if not looks:
            found.jobs.pop("gone-2")
        looks.append(ev.id)
        return found

    monkeypatch.setattr(service.records, "find_children", first_look_misses_gone_2)
    monkeypatch.setattr(store, "alive", lambda _host: True)

    said = service.abort(ev_id, by="test")

    assert "2 of 2 child jobs stopped or being aborted, 0 had ended" in said, said
    assert all(store.get(child).abort_requested for child in children.values())
    assert len(looks) == 3  # the first, the one that found gone-2, one that found nothing new
