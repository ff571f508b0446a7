"""An evacuation record written into Redis by hand (no signed request, an old one, one set
back from its end) moves no guest: the evacuated host's watch verifies the request before it
plans, queues, retries or aborts anything, and ends such an evacuation `failed` with a
`security.rejected` event. A failed child is queued again only when its own record carries a
request a trusted key signed for this evacuation. Against the real test Redis and libvirt's
`test:///default` driver (one hypervisor seen as every host), with signing on."""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from config.settings import Settings, load_settings
from jobs.evacuation import EVACUATION_KIND, Evacuation, EvacuationSpec, EvacuationStore, Placement
from jobs.keys import job_key
from jobs.request_signing import RequestSigner, signed_record, signer_for
from jobs.spec import MigrationSpec
from jobs.states import EvacuationState, JobState
from jobs.store import JobStore, now
from jobs.submission import enqueue
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY, make_fleet_keys, signing_section, with_state_dirs
from worker import evacuation, evacuation_children
from worker.evacuation import attest
from worker.evacuation_plan import end
from worker.evacuation_watch import check
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost
from worker.runtime import Runtime

TEST_URI = "test:///default"
GUEST = "test"  # the test driver's running, persistent guest
SPEC = EvacuationSpec(host="kvm1", to=["kvm2"])
Logs = list[MutableMapping[str, Any]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fleet_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def settings(
    tmp_path: Path, redis_srv: RedisServer, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    config = tmp_path / "drover.toml"
    registry = with_state_dirs(REGISTRY.format(url=redis_srv.url), tmp_path / "state")
    config.write_text(registry + signing_section(keys))
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return load_settings(config)


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The children the worker would sign and queue (domain -> destination), recorded
    instead; and a planning that places the test guest on kvm2 without asking any peer."""
    seen: list[str] = []

    def queue_child(_rt: Runtime, _ev: Evacuation, placement: Placement, **_: object) -> str:
        seen.append(f"{placement.domain}->{placement.destination}")
        return "c0c0c0c0c0ff"

    monkeypatch.setattr(evacuation_children, "_queue_child", queue_child)
    monkeypatch.setattr(evacuation_children, "admit_waiting", lambda _rt: None)
    monkeypatch.setattr(evacuation, "admit_waiting", lambda _rt: None)
    monkeypatch.setattr(
        evacuation, "gather", lambda *_: SimpleNamespace(candidates=[], unavailable={})
    )
    monkeypatch.setattr(evacuation, "planned", lambda rt, _ev, _view: [placement(rt)])
    yield seen


@pytest.fixture
def rt(settings: Settings, store: JobStore, tmp_path: Path) -> Runtime:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    seam = LibvirtHost(TEST_URI, opener=lambda _uri: libvirt.open(TEST_URI))
    return Runtime("kvm1", store, seam, Ledger(str(tmp_path / "ledger")))


def placement(rt: Runtime) -> Placement:
    dom = rt.libvirt.by_name(GUEST)
    assert dom is not None
    return Placement(
        domain=GUEST,
        uuid=dom.UUIDString(),
        memory_mib=64,
        active=True,
        persistent=True,
        destination="kvm2",
    )


def forge(
    store: JobStore,
    ev_id: str,
    state: str,
    signer: RequestSigner | None = None,
    signed_ago: timedelta = timedelta(0),
    **extra: str,
) -> str:
    """An evacuation record written field by field, as `redis-cli HSET` would."""
    ts = now()
    record = {
        "id": ev_id,
        "kind": EVACUATION_KIND,
        "state": state,
        "spec": SPEC.model_dump_json(),
        "origin": "producer@forger",
        "created": ts.isoformat(),
        "updated": ts.isoformat(),
        **extra,
    }
    record |= signed_record(
        signer, kind=EVACUATION_KIND, job_id=ev_id, spec=SPEC, origin="x", at=ts - signed_ago
    )
    store.r.hset(job_key(ev_id), mapping=record)
    store.r.sadd("drover:evacuations:active", ev_id)
    return ev_id


def rejected(logs: Logs) -> list[str]:
    return [str(e["reason"]) for e in logs if e["event"] == "security.rejected"]


def assert_refused(store: JobStore, ev_id: str, logs: Logs, queued: list[str], why: str) -> None:
    ev = EvacuationStore(store).get(ev_id)
    assert queued == []
    assert ev.state is EvacuationState.FAILED, ev
    assert ev.reason is not None and ev.reason.startswith("security: ") and why in ev.reason
    assert any(why in reason for reason in rejected(logs)), logs


def test_an_unsigned_planning_evacuation_queues_nothing_and_fails(
    rt: Runtime, store: JobStore, queued: list[str]
) -> None:
    """Variant A: a planning record with no request at all (it planned, signed and queued a
    child with the worker's own key before)."""
    ev_id = forge(store, "f0f0f0f0f001", "planning")
    with capture_logs() as logs:
        check(rt, ev_id)
    assert_refused(store, ev_id, logs, queued, "no signed request")


def test_an_unsigned_running_evacuation_retries_no_forged_failed_child(
    rt: Runtime, store: JobStore, queued: list[str]
) -> None:
    """Variant B: a running record with a hand-written plan and a forged failed child."""
    plan = json.dumps([placement(rt).model_dump(mode="json")])
    ev_id = forge(store, "f0f0f0f0f002", "running", plan=plan)
    child = store.create(
        MigrationSpec(domain=GUEST, src="kvm1", dst="kvm2"), host="x", parent=ev_id
    )
    assert store.transition(child, JobState.FAILED, host="x", reason="blip")[0]
    store.r.hset(f"{job_key(ev_id)}:children", GUEST, child)
    with capture_logs() as logs:
        check(rt, ev_id)
    assert_refused(store, ev_id, logs, queued, "no signed request")


def test_a_request_older_than_request_max_age_starts_nothing_until_it_was_started(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """A properly signed evacuation's state set back to planning days later is refused for
    its age; one this worker started (its own signed `started`) goes on however old."""
    signer = signer_for(settings.security)
    old = forge(store, "0a0a0a0a0a01", "planning", signer, timedelta(days=2))
    with capture_logs() as logs:
        check(rt, old)
    assert_refused(store, old, logs, queued, "request_max_age")

    running = forge(store, "0a0a0a0a0a02", "planning", signer, timedelta(days=2))
    attest(rt, EvacuationStore(store), EvacuationStore(store).get(running))
    check(rt, running)
    assert EvacuationStore(store).get(running).state is EvacuationState.RUNNING
    assert queued == [f"{GUEST}->kvm2"]


def test_an_ended_evacuation_set_back_to_a_live_state_is_not_acted_on(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """A signed, started evacuation ends; its state (and reason) set back by hand is not
    planned again, in this process or in another one (the record's `ended` mark)."""
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(SPEC, "producer@test", signer=signer_for(settings.security))
    evacuations.transition(ev_id, EvacuationState.PLANNING)
    attest(rt, evacuations, evacuations.get(ev_id))
    end(evacuations, evacuations.get(ev_id), EvacuationState.FAILED, "planning failed: x")
    for forget_here in (False, True):
        if forget_here:
            evacuation.ENDED_HERE.clear()  # another process, or this one restarted
        store.r.hset(job_key(ev_id), "state", "planning")
        store.r.hdel(job_key(ev_id), "reason")
        store.r.sadd("drover:evacuations:active", ev_id)
        with capture_logs() as logs:
            check(rt, ev_id)
        assert_refused(store, ev_id, logs, queued, "had ended")


def test_a_forged_failed_child_of_a_signed_evacuation_is_not_queued_again(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """The evacuation is real and running; its failed child was written by hand (no signed
    request): the watch does not sign a new migration for it."""
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(SPEC, "producer@test", signer=signer_for(settings.security))
    evacuations.transition(ev_id, EvacuationState.PLANNING)
    attest(rt, evacuations, evacuations.get(ev_id))
    evacuations.save_plan(ev_id, [placement(rt)])
    evacuations.transition(ev_id, EvacuationState.RUNNING)
    child = store.create(
        MigrationSpec(domain=GUEST, src="kvm1", dst="kvm2"), host="x", parent=ev_id
    )
    assert store.transition(child, JobState.FAILED, host="x", reason="blip")[0]
    store.r.hset(f"{job_key(ev_id)}:children", GUEST, child)
    with capture_logs() as logs:
        check(rt, ev_id)
    assert queued == []
    refusals = [e for e in logs if e["event"] == "security.rejected"]
    assert [(e["child"], e["domain"]) for e in refusals] == [(child, GUEST)], logs
    assert "no signed request" in str(refusals[0]["reason"])


def running_evacuation(rt: Runtime, store: JobStore, settings: Settings, **fields: Any) -> str:
    """A signed evacuation of kvm1, planned (the test guest to kvm2) and running."""
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(SPEC, "producer@test", signer=signer_for(settings.security))
    evacuations.transition(ev_id, EvacuationState.PLANNING)
    attest(rt, evacuations, evacuations.get(ev_id))
    evacuations.save_plan(ev_id, [placement(rt).model_copy(update=fields)])
    evacuations.transition(ev_id, EvacuationState.RUNNING)
    return ev_id


def signed_child(store: JobStore, settings: Settings, ev_id: str, domain: str = GUEST) -> str:
    """The child the watch queued: signed for this evacuation, migrating now."""
    child = enqueue(
        store,
        MigrationSpec(domain=domain, src="kvm1", dst="kvm2", live=True),
        origin=f"evacuation {ev_id}",
        parent=ev_id,
        parent_limit=SPEC.max_parallel,
        signer=signer_for(settings.security),
    )
    for state in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING):
        assert store.transition(child, state, host="kvm1")[0]
    return child


def copy_forged(store: JobStore, real: str, forged: str, **fields: str) -> None:
    """`redis-cli` copy of a real child's record, its signed request left out."""
    record = {k: v for k, v in store.r.hgetall(job_key(real)).items() if k != "request"}
    store.r.hset(job_key(forged), mapping={**record, "id": forged, **fields})


def test_a_forged_succeeded_child_does_not_end_the_evacuation_under_its_real_one(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """The list names a copy of the real child, written `succeeded` with no signed request,
    while the real one migrates: the watch finds the real child by its lease and waits for
    it (before: the evacuation ended `partial` at once, with its guest mid-migration)."""
    ev_id = running_evacuation(rt, store, settings)
    real = signed_child(store, settings, ev_id)
    copy_forged(store, real, "fa0000000001", state="succeeded")
    store.r.hset(f"{job_key(ev_id)}:children", GUEST, "fa0000000001")
    with capture_logs() as logs:
        check(rt, ev_id)
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.RUNNING, ev.reason
    assert ev.children == {GUEST: real}  # the real child put back in the list
    (refused,) = [e for e in logs if e["event"] == "security.rejected"]
    assert refused["child"] == "fa0000000001"


def test_a_forged_live_child_of_a_domain_not_in_the_plan_holds_nothing_open(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """Every planned guest's child ended; the list also names a `ghost-1` that is not in the
    plan, with a live record: the evacuation ends (before: `running` for ever)."""
    ev_id = running_evacuation(rt, store, settings)
    real = signed_child(store, settings, ev_id)
    assert store.transition(real, JobState.FAILED, host="kvm1", reason="x")[0]
    EvacuationStore(store).mark_reported(ev_id, real)  # its end already reported
    ghost = MigrationSpec.model_validate_json(store.r.hget(job_key(real), "spec") or "")
    ghost_spec = ghost.model_copy(update={"domain": "ghost-1"}).model_dump_json()
    copy_forged(store, real, "fb0000000002", state="migrating", spec=ghost_spec)
    store.r.hset(f"{job_key(ev_id)}:children", mapping={GUEST: real, "ghost-1": "fb0000000002"})
    check(rt, ev_id)
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.PARTIAL  # the test guest still runs here
    assert "ghost-1" not in (ev.reason or "")


@pytest.mark.parametrize("rewrite", ["not persistent", "cold, sent to the source"])
def test_a_rewritten_plan_does_not_make_a_host_still_holding_a_guest_drained(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str], rewrite: str
) -> None:
    """The test guest is still defined here, shut off; its placement is rewritten to say it
    was never persistent (and, cold, to send it to the source itself), and its child ended:
    libvirt on this host says it did not move (before: `partial` for a reason libvirt did
    not show, or `drained` with `left_on_host` empty)."""
    fields: dict[str, Any] = {"persistent": False}
    if rewrite == "cold, sent to the source":  # the source's libvirtd "shows it there"
        fields.update(destination="kvm1", active=False)
    ev_id = running_evacuation(rt, store, settings, **fields)
    dom = rt.libvirt.by_name(GUEST)
    assert dom is not None
    dom.destroy()  # shut off, still defined here: the plan's word would not count it
    try:
        real = signed_child(store, settings, ev_id)
        assert store.transition(real, JobState.CANCELLED, host="kvm1", reason="x")[0]
        check(rt, ev_id)
    finally:
        dom.create()
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.PARTIAL, ev.reason
    (outcome,) = ev.outcome or []
    assert outcome.on_source and not outcome.moved


@pytest.mark.parametrize("set_back_to", ["planning", "queued"])
def test_an_evacuation_set_back_by_hand_neither_ends_nor_queues_under_its_live_child(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str], set_back_to: str
) -> None:
    """A running evacuation written back to `planning` (or `queued`, then sent again) and
    its list of children deleted, while its child migrates (the attacker probe): the watch
    found no child, queued the domain again (refused: busy), took it out of the plan and
    ended the evacuation `partial` under its live child. Now the child is found by its own
    record, nothing is queued again, and the evacuation runs on."""
    ev_id = running_evacuation(rt, store, settings)
    real = signed_child(store, settings, ev_id)
    store.r.hset(f"{job_key(ev_id)}:children", GUEST, real)
    store.r.hset(job_key(ev_id), "state", set_back_to)
    store.r.delete(f"{job_key(ev_id)}:children")
    evacuations = EvacuationStore(store)
    if set_back_to == "queued":  # the task sent again plans it: as the worker runs it
        evacuation.start(rt, ev_id)
    else:
        check(rt, ev_id)
    ev = evacuations.get(ev_id)
    assert queued == []
    assert ev.state is EvacuationState.RUNNING, ev.reason
    assert ev.children == {GUEST: real}
    assert [p.destination for p in ev.plan or []] == ["kvm2"]


def test_a_domain_taken_out_of_the_plan_under_its_live_child_does_not_end_the_evacuation(
    rt: Runtime, store: JobStore, settings: Settings, queued: list[str]
) -> None:
    """While the test guest's child migrates, its placement is deleted from the plan and its
    entry from the list of children (attacker probe, lab 17): the watch found no child and
    ended the evacuation `partial`, the guest "appeared after planning", while the child went
    on and landed it. A child signed for this evacuation is one whatever the plan says: the
    evacuation waits for it."""
    ev_id = running_evacuation(rt, store, settings)
    real = signed_child(store, settings, ev_id)
    store.r.hset(f"{job_key(ev_id)}:children", GUEST, real)
    store.r.hset(job_key(ev_id), "plan", "[]")  # the plan rewritten without it
    store.r.delete(f"{job_key(ev_id)}:children")
    check(rt, ev_id)
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.RUNNING, ev.reason
    assert ev.children == {GUEST: real}  # found by its own record, put back in the list
    assert queued == []


def test_a_child_queued_as_the_abort_is_asked_is_stopped_at_once(
    rt: Runtime, store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe: `drover abort EVAC` listed the evacuation's children a moment before the watch
    queued one ("0 of 0 child jobs stopped"), and that child then migrated. The watch looks
    at the abort again once a child is made: the child is cancelled before it starts, and
    no other child is queued."""
    ev_id = running_evacuation(rt, store, settings)
    evacuations = EvacuationStore(store)
    real = evacuation_children._queue_child
    made: list[str] = []

    def queue_then_abort(rt_: Runtime, ev: Evacuation, p: Placement, **event: Any) -> str:
        made.append(real(rt_, ev, p, **event))
        evacuations.request_abort(ev_id, "aborted by operator@test")  # the producer, meanwhile
        return made[-1]

    monkeypatch.setattr(evacuation_children, "_queue_child", queue_then_abort)
    evacuation_children.queue_children(rt, evacuations, evacuations.get(ev_id))
    [child] = made
    job = store.get(child)
    assert job.state is JobState.CANCELLED, (job.state, job.reason)
