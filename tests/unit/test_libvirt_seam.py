"""Phases' checks, recovery's decisions and evacuation planning, run without root against
libvirt's own `test:///default` driver (real libvirt: lookups, definitions, states; no
migration) and the real test Redis. The worker is handed a `LibvirtHost` whose every
connection, its own and its peers', opens that driver: one hypervisor seen as both hosts.

Every claim about a migration itself stays on the lab (tests/lab, tests/faults).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest
import structlog
from structlog.contextvars import bound_contextvars

from config import events
from jobs.evacuation import Evacuation, EvacuationSpec, EvacuationStore, Placement
from jobs.host_facts import HostCpu, HostFacts, publish_facts
from jobs.keys import evacuation_retries_key, job_key
from jobs.maintenance import Maintenance
from jobs.phases import Phase
from jobs.record import SourceFacts
from jobs.spec import MigrationSpec
from jobs.states import EvacuationState, JobState
from jobs.store import JobStore
from worker import evacuation_children, job_end
from worker.evacuation_children import _placement_problem, retry_failed
from worker.evacuation_watch import check
from worker.fleet_view import gather
from worker.job_end import job_context
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost, LibvirtUnavailable, UnsafeURI
from worker.phase_destination import destination_prepare, finish
from worker.phase_errors import PhaseFailed
from worker.phase_frame import run_in_frame
from worker.phase_source import confirm, source_preflight
from worker.placement import Estimate, plan
from worker.recovery_perform import recover_perform
from worker.rollback import rollback_destination
from worker.runtime import Runtime

TEST_URI = "test:///default"
GUEST = "test"  # the running, persistent domain the test driver starts with
IDLE_XML = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type></os></domain>"""
WALK = (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING)


@pytest.fixture
def hv() -> Iterator[libvirt.virConnect]:
    """The test driver, left as it was found: the guest running, no extra domains."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(TEST_URI)
    yield conn
    dom = conn.lookupByName(GUEST)
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    for extra in conn.listAllDomains():
        if extra.name() == GUEST:
            continue
        persistent = extra.isPersistent()
        if extra.isActive():
            extra.destroy()  # a transient domain is gone with it
        if persistent:
            extra.undefine()
    conn.close()


def seam() -> LibvirtHost:
    """The worker's seam, every URI (its own, a peer's) opening the one test hypervisor."""
    return LibvirtHost(TEST_URI, opener=lambda _uri: libvirt.open(TEST_URI))


def peers_unreachable() -> LibvirtHost:
    """The seam with its own libvirtd (the test hypervisor) and no peer's reachable."""

    def own_only(uri: str) -> libvirt.virConnect:
        if uri != TEST_URI:
            raise libvirt.libvirtError(f"cannot reach {uri}")
        return libvirt.open(TEST_URI)

    return LibvirtHost(TEST_URI, opener=own_only)


@pytest.fixture
def env(config: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return config


def runtime(
    store: JobStore, host: str, tmp_path: Path, libvirt_host: LibvirtHost | None = None
) -> Runtime:
    """A worker's runtime on `host`: the test hypervisor as every host unless told otherwise."""
    ledger = Ledger(str(tmp_path / f"ledger-{host}"))
    return Runtime(host, store, libvirt_host or seam(), ledger)


def destination_empty(tmp_path: Path) -> LibvirtHost:
    """The seam with its own libvirtd (the test hypervisor) and a destination that answers
    and has no domains at all (a test driver node of its own)."""
    empty = tmp_path / "empty-node.xml"
    empty.write_text(EMPTY_NODE_XML)
    return LibvirtHost(
        TEST_URI,
        opener=lambda uri: libvirt.open(TEST_URI if uri == TEST_URI else f"test://{empty}"),
    )


def job_for(store: JobStore, domain: str = GUEST, **spec: object) -> str:
    fields = {"domain": domain, "src": "kvm1", "dst": "kvm2", **spec}
    return store.create(MigrationSpec.model_validate(fields), host="test")


def walked(store: JobStore, job_id: str, to: JobState) -> None:
    """The job moved on as far as `to`, as its phases would have moved it."""
    for state in WALK[: WALK.index(to) + 1]:
        moved, _ = store.transition(job_id, state, host="test")
        assert moved, state


def seen_here(rt: Runtime, job_id: str, facts: dict[str, object]) -> None:
    """What a phase on `rt`'s host saw of the guest, as it keeps it (its ledger) and records
    it (the job record), the same."""
    rt.ledger.remember_facts(job_id, SourceFacts.model_validate(facts))
    rt.store.update(job_id, facts=facts)


def guest_uuid(hv: libvirt.virConnect) -> str:
    return str(hv.lookupByName(GUEST).UUIDString())


def recorded(uuid: str, **seen: object) -> dict[str, object]:
    """Source facts as a preflight writes them (a whole record: the store checks its shape),
    the test guest running and persistent unless `seen` says otherwise."""
    facts: dict[str, object] = {
        "name": GUEST,
        "uuid": uuid,
        "state": "running",
        "active": True,
        "persistent": True,
        "memory_mib": 64,
        "vcpus": 1,
    }
    return facts | seen


# --- source_preflight -----------------------------------------------------------------------


def test_preflight_records_what_libvirt_shows_and_holds_the_domain(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    # The test driver's guest has a disk on a path no host shares: --unsafe lets it pass
    # the disk check (tests/lab/test_prechecks.py holds that check against real libvirt).
    job_id = job_for(store, unsafe=True)
    assert source_preflight(runtime(store, "kvm1", tmp_path), store.get(job_id)) is None
    job = store.get(job_id)
    assert job.state is JobState.PREFLIGHT
    assert job.source.uuid == guest_uuid(hv)
    assert job.source.state == "running" and job.source.persistent is True
    again = job_for(store, unsafe=True)  # a second job for the same guest: its uuid is held
    with pytest.raises(PhaseFailed, match=f"already has an active job {job_id}"):
        source_preflight(runtime(store, "kvm1", tmp_path), store.get(again))


def test_preflight_refuses_a_domain_the_source_does_not_have(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = job_for(store, domain="absent")
    with pytest.raises(PhaseFailed, match="absent is not defined on kvm1"):
        source_preflight(runtime(store, "kvm1", tmp_path), store.get(job_id))


def test_preflight_refuses_what_the_mode_cannot_move(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    hv.defineXML(IDLE_XML.format(name="idle"))  # defined, not running
    hv.createXML(IDLE_XML.format(name="fleeting"), 0)  # running, never defined
    rt = runtime(store, "kvm1", tmp_path)
    with pytest.raises(PhaseFailed, match="idle is shutoff on kvm1; only --offline"):
        source_preflight(rt, store.get(job_for(store, domain="idle")))
    offline = job_for(store, domain="fleeting", offline=True, live=False, persistent=True)
    with pytest.raises(PhaseFailed, match="fleeting is transient on kvm1"):
        source_preflight(rt, store.get(offline))


# --- destination_prepare and finish ---------------------------------------------------------


def test_prepare_refuses_a_guest_already_running_on_the_destination(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = job_for(store)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    with pytest.raises(PhaseFailed, match=f"test \\({guest_uuid(hv)}\\) is already running"):
        destination_prepare(runtime(store, "kvm2", tmp_path), store.get(job_id))


def test_prepare_believes_the_source_s_libvirtd_not_the_record(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = job_for(store)
    forged = "00000000-0000-0000-0000-000000000001"
    store.update(job_id, facts=recorded(forged))
    with pytest.raises(PhaseFailed, match=f"has uuid {guest_uuid(hv)}, not the job's {forged}"):
        destination_prepare(runtime(store, "kvm2", tmp_path), store.get(job_id))


def test_prepare_refuses_a_destination_in_maintenance(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    Maintenance(store.r).disable("kvm2", "disk swap", by="test")
    job_id = job_for(store)
    with pytest.raises(PhaseFailed, match="disk swap"):
        destination_prepare(runtime(store, "kvm2", tmp_path), store.get(job_id))


def test_finish_checks_the_arrived_guest_against_the_spec(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    rt = runtime(store, "kvm2", tmp_path)
    transient = job_for(store)  # the guest here is persistent; the job asked for transient
    seen_here(rt, transient, recorded(guest_uuid(hv)))
    walked(store, transient, JobState.MIGRATING)
    with pytest.raises(PhaseFailed, match="test on kvm2 is persistent, expected transient") as e:
        finish(rt, store.get(transient))
    # Where the guest is, said (probe: "failed" read as "on the source, rolled back").
    assert "libvirt shows it on kvm2 (running), where it stays" in str(e.value)

    kept = job_for(store, persistent=True)
    seen_here(rt, kept, recorded(guest_uuid(hv)))
    walked(store, kept, JobState.MIGRATING)
    assert finish(rt, store.get(kept)) is None
    job = store.get(kept)
    assert job.state is JobState.FINISHING
    assert job.result.destination is not None and job.result.destination.state == "running"


def test_finish_judges_the_arrival_by_what_this_host_saw_not_by_the_record(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """The record's facts rewritten mid-flight (the source was "paused", its config "already
    here"): finish used to fail a job whose guest had arrived running as it should, with
    confirm never run. It judges by this host's prepare's look (its ledger)."""
    rt = runtime(store, "kvm2", tmp_path)
    job_id = job_for(store, persistent=True)
    seen_here(rt, job_id, recorded(guest_uuid(hv)))
    store.update(job_id, facts=recorded(guest_uuid(hv), state="paused", dest_config_present=True))
    walked(store, job_id, JobState.MIGRATING)
    assert finish(rt, store.get(job_id)) is None
    assert store.get(job_id).state is JobState.FINISHING

    paused = job_for(store, persistent=True)  # this host saw it paused: running is wrong
    seen_here(rt, paused, recorded(guest_uuid(hv), state="paused"))
    store.update(paused, facts=recorded(guest_uuid(hv), state="running"))
    walked(store, paused, JobState.MIGRATING)
    with pytest.raises(PhaseFailed, match="test on kvm2 is running, expected paused"):
        finish(rt, store.get(paused))


def test_finish_without_this_hosts_look_takes_what_libvirt_may_leave(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """No look of this host's (its ledger lost): the spec's asks are still checked, and for
    the rest either of libvirt's outcomes is accepted, never the record's word."""
    rt = runtime(store, "kvm2", tmp_path)
    job_id = job_for(store)  # transient asked; the guest here is persistent: not known wrong
    store.update(job_id, facts=recorded(guest_uuid(hv), state="paused"))
    walked(store, job_id, JobState.MIGRATING)
    assert finish(rt, store.get(job_id)) is None
    suspended = job_for(store, suspend=True)  # signed: --suspend leaves it paused
    store.update(suspended, facts=recorded(guest_uuid(hv)))
    walked(store, suspended, JobState.MIGRATING)
    with pytest.raises(PhaseFailed, match="test on kvm2 is running, expected paused"):
        finish(rt, store.get(suspended))


def test_finish_refuses_a_record_whose_uuid_names_another_domain(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    hv.defineXML(IDLE_XML.format(name="other"))
    job_id = job_for(store, persistent=True)
    other = str(hv.lookupByName("other").UUIDString())
    store.update(job_id, facts=recorded(other))
    walked(store, job_id, JobState.MIGRATING)
    with pytest.raises(PhaseFailed, match="the job's uuid is other on kvm2, not test"):
        finish(runtime(store, "kvm2", tmp_path), store.get(job_id))


FORGED_UUID = "00000000-1111-2222-3333-444444444444"


def test_finish_looks_the_guest_up_by_this_hosts_uuid_not_the_records(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """The record's uuid rewritten mid-migration: finish used to miss the guest that had
    arrived ("not on kvm2"), fail its job and send the rollback that removed its disk. It
    looks the guest up by the uuid this host's prepare saw, and forgets the images made for
    the job: they are the arrived guest's disks now."""
    rt = runtime(store, "kvm2", tmp_path)
    job_id = job_for(store, persistent=True)
    seen_here(rt, job_id, recorded(guest_uuid(hv)))
    rt.ledger.record_image(job_id, str(tmp_path / "made.qcow2"))
    store.update(job_id, facts=recorded(FORGED_UUID))
    walked(store, job_id, JobState.MIGRATING)
    assert finish(rt, store.get(job_id)) is None
    job = store.get(job_id)
    assert job.state is JobState.FINISHING
    assert job.result.destination is not None and job.result.destination.uuid == guest_uuid(hv)
    assert rt.ledger.images(job_id) == []


def images_on_kvm2(config: Path, tmp_path: Path) -> Path:
    """kvm2's storage directory made a temporary one (a rollback removes only under it)."""
    images = tmp_path / "images"
    images.mkdir()
    text = config.read_text().replace(
        "[hosts.kvm2]\n", f'[hosts.kvm2]\nstorage_dirs = ["{images}"]\n', 1
    )
    config.write_text(text)
    return images


def failed_with_an_image(
    rt: Runtime, store: JobStore, images: Path, facts: dict[str, object]
) -> tuple[str, Path]:
    """A job that made an image here and failed, its record's facts `facts`."""
    job_id = job_for(store)
    image = images / "disk.qcow2"
    image.write_text("the guest's disk")
    rt.ledger.record_image(job_id, str(image))
    store.update(job_id, facts=facts)
    walked(store, job_id, JobState.MIGRATING)
    moved, _ = store.transition(job_id, JobState.FAILED, host="test", reason="forged")
    assert moved
    return job_id, image


def test_a_rollback_never_takes_a_guest_that_arrived_for_absent_whatever_its_uuid_in_redis(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """A job made to look failed, its record's uuid rewritten: the rollback used to look for
    the guest by that uuid, find nothing, and remove the image the arrived guest runs on."""
    images = images_on_kvm2(env, tmp_path)
    rt = runtime(store, "kvm2", tmp_path)
    job_id, image = failed_with_an_image(rt, store, images, recorded(FORGED_UUID))
    rt.ledger.remember_facts(job_id, SourceFacts.model_validate(recorded(guest_uuid(hv))))
    rollback_destination(rt, store.get(job_id))
    assert image.read_text() == "the guest's disk"
    assert hv.lookupByName(GUEST).isActive()
    # Its disks now: forgotten, so that no later pass removes them once the guest stops.
    assert rt.ledger.images(job_id) == [] and rt.ledger.jobs_with_leftovers() == []


def test_a_rollback_after_a_failed_finish_keeps_the_guest_that_arrived_and_says_so(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """Probe: the guest arrived, someone paused or undefined it during finish, finish failed
    the job, and the rollback said only `rollback.done`. The guest stays where it runs, and
    the rollback says it kept it."""
    rt = runtime(store, "kvm2", tmp_path)
    job_id = job_for(store)
    uuid = guest_uuid(hv)
    rt.ledger.remember_facts(job_id, SourceFacts.model_validate(recorded(uuid)))
    assert rt.ledger.take_incoming(uuid, job_id, lambda _job: False) is None
    assert rt.ledger.claim(job_id, Phase.FINISH.value)  # finish ran here, and failed it
    walked(store, job_id, JobState.MIGRATING)
    assert store.transition(job_id, JobState.FAILED, host="kvm2", reason="finish")[0]
    with bind_log(store, "kvm2"), bound_contextvars(job_id=job_id):
        rollback_destination(rt, store.get(job_id))
    assert hv.lookupByName(GUEST).isActive()
    said = [e for _, e in store.read_events(job_id) if e["event"].startswith("rollback.")]
    assert [e["event"] for e in said] == ["rollback.kept_arrived", "rollback.done"], said
    assert said[0]["uuid"] == uuid and "kept" in said[0]["reason"]


def test_a_rollback_keeps_the_images_when_the_source_does_not_run_the_guest(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """Not arrived here, and the source's libvirtd does not run the guest (here: the domain
    of that name there is another one, by uuid): the images may hold its newest disk writes."""
    images = images_on_kvm2(env, tmp_path)
    rt = runtime(store, "kvm2", tmp_path)
    job_id, image = failed_with_an_image(rt, store, images, recorded(FORGED_UUID))
    with bind_log(store, "kvm2"), bound_contextvars(job_id=job_id):
        rollback_destination(rt, store.get(job_id))
    assert image.read_text() == "the guest's disk" and rt.ledger.images(job_id) == []
    kept = [e for _, e in store.read_events(job_id) if e["event"] == "rollback.kept_images"]
    assert kept and "kvm1 does not run" in kept[0]["reason"], kept


def test_a_rollback_never_removes_an_image_a_domain_here_names(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """Whatever the ledger and the record say, an image that a domain defined on this host
    uses (here, a shut-off one) stays, and the rollback says so."""
    images = images_on_kvm2(env, tmp_path)
    rt = runtime(store, "kvm2", tmp_path)
    job_id, image = failed_with_an_image(rt, store, images, recorded(FORGED_UUID))
    disk = f"<devices><disk type='file' device='disk'><source file='{image}'/>"
    owner = IDLE_XML.format(name="owner")
    hv.defineXML(owner.replace("</os>", f"</os>{disk}<target dev='vda'/></disk></devices>"))
    with bind_log(store, "kvm2"), bound_contextvars(job_id=job_id):
        rollback_destination(rt, store.get(job_id))
    assert image.read_text() == "the guest's disk"
    events = [e for _, e in store.read_events(job_id)]
    kept = [e for e in events if e["event"] == "rollback.kept_images"]
    assert kept and kept[0]["paths"] == [str(image)], events


def test_a_rollback_keeps_the_images_of_a_job_that_reached_post_copy(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """Its guest ran here in post-copy, then its copy was lost (worker/postcopy_recovery.py
    fails such a job): the images may hold its newest disk writes. Kept, and forgotten by
    the ledger so that no later rollback removes them."""
    images = images_on_kvm2(env, tmp_path)
    rt = runtime(store, "kvm2", tmp_path)
    job_id, image = failed_with_an_image(rt, store, images, recorded(FORGED_UUID))
    store.mark_postcopy(job_id)
    with bind_log(store, "kvm2"), bound_contextvars(job_id=job_id):
        rollback_destination(rt, store.get(job_id))
    assert image.read_text() == "the guest's disk"
    assert rt.ledger.images(job_id) == []
    events = [e for _, e in store.read_events(job_id)]
    kept = [e for e in events if e["event"] == "rollback.kept_images"]
    assert kept and kept[0]["paths"] == [str(image)] and "post-copy" in kept[0]["reason"]
    rollback_destination(rt, store.get(job_id))  # run again (the keeper's leftovers pass)
    assert image.read_text() == "the guest's disk"


def test_confirm_reports_a_source_copy_still_running_as_leftovers(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    job_id = job_for(store)
    store.update(job_id, facts=recorded(guest_uuid(hv), persistent=True, active=True))
    assert confirm(runtime(store, "kvm1", tmp_path), store.get(job_id)) is JobState.SUCCEEDED
    result = store.get(job_id).result
    assert "test on kvm1 is still active after migrating" in (result.leftovers or "")
    assert result.source_defined is True


# A hypervisor with no domain at all: the destination, when the guest never reached it.
EMPTY_NODE_XML = (
    "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>1</cores><threads>1</threads>"
    "<active>1</active><mhz>1000</mhz><model>i686</model></cpu><memory>1048576</memory></node>"
)


def test_confirm_fails_a_job_whose_guest_never_left_whatever_the_record_says_of_finish(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
    rollbacks: list[str],
) -> None:
    """A failed job rewritten in Redis to look finished (a finish record ended without error):
    the guest still runs on the source and the destination's libvirtd does not have it. The
    job used to end `succeeded` with the guest 'left over' on the source; it fails."""
    job_id = job_for(store)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    walked(store, job_id, JobState.MIGRATING)
    for phase in (Phase.PERFORM.value, Phase.FINISH.value):  # as forged: both "ended well"
        store.phase_ended(job_id, phase, started=store.phase_started(job_id, phase, "kvm1"))
    rt = runtime(store, "kvm1", tmp_path, destination_empty(tmp_path))
    with pytest.raises(PhaseFailed, match="test on kvm1 still runs and kvm2's libvirtd does not"):
        run_in_frame(rt, store.get(job_id), Phase.CONFIRM, confirm, False, 0)
    job = store.get(job_id)
    assert job.state is JobState.FAILED, job.state
    assert "the guest never left" in (job.reason or "")
    assert hv.lookupByName(GUEST).isActive()


# --- recovery of an interrupted perform -----------------------------------------------------


@pytest.fixture
def rollbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs whose destination was asked to roll back: recorded here rather than published
    on the process-wide Celery app, whose broker a unit test does not choose."""
    asked: list[str] = []
    monkeypatch.setattr(job_end, "rollback_destination_later", lambda job: asked.append(job.id))
    return asked


def test_recovery_finds_no_migration_and_the_guest_still_here(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    """The guest runs on the source, left paused by the migration that died with its worker:
    it runs again, the job fails with why, and the destination is asked to roll back."""
    job_id = job_for(store)
    rt = runtime(store, "kvm1", tmp_path)
    seen_here(rt, job_id, recorded(guest_uuid(hv)))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    hv.lookupByName(GUEST).suspend()
    assert recover_perform(rt, store.get(job_id)) is False
    assert hv.lookupByName(GUEST).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    job = store.get(job_id)
    assert job.state is JobState.FAILED
    assert job.reason == (
        "the migration did not complete while kvm1's worker could not follow it; "
        "test still running on kvm1"
    )
    assert job.phases[Phase.PERFORM.value].error == job.reason
    assert rollbacks == [job_id]


def test_a_guest_paused_before_its_migration_is_never_resumed_whatever_the_record_says(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    """The operator paused the guest, preflight saw it paused; the record's facts were then
    rewritten to "running". A failed migration used to resume it (the record's word): it
    stays paused, as this host's preflight saw it (its ledger). With no look of this host's
    at all, nothing is resumed either."""
    hv.lookupByName(GUEST).suspend()
    for looked in (True, False):
        job_id = job_for(store)
        rt = runtime(store, "kvm1", tmp_path / str(looked))
        if looked:
            seen_here(rt, job_id, recorded(guest_uuid(hv), state="paused"))
        store.update(job_id, facts=recorded(guest_uuid(hv), state="running"))
        walked(store, job_id, JobState.MIGRATING)
        store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
        assert recover_perform(rt, store.get(job_id)) is False
        assert hv.lookupByName(GUEST).state()[0] == libvirt.VIR_DOMAIN_PAUSED, looked
        assert store.get(job_id).state is JobState.FAILED


def test_recovery_judges_a_post_copy_libvirt_does_not_show_from_libvirt(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    """A job set to `postcopy_recovering` in Redis while its guest runs on the source, in no
    post-copy, and the destination has none: recovery used to resume a post-copy that is not
    there until `postcopy_recovery_timeout` (an hour), then call the running guest
    `postcopy_paused`. It judges from libvirt instead: the guest still runs here, the job
    fails saying so, and the destination is rolled back."""
    job_id = job_for(store)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    moved, _ = store.transition(job_id, JobState.POSTCOPY_RECOVERING, host="forged")
    assert moved
    job = store.get(job_id)
    rt = runtime(store, "kvm1", tmp_path, destination_empty(tmp_path))
    with bind_log(store, "kvm1"), bound_contextvars(**job_context(job, Phase.PERFORM.value)):
        recovered = recover_perform(rt, job)
    assert recovered is False
    assert hv.lookupByName(GUEST).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    job = store.get(job_id)
    assert job.state is JobState.FAILED, job.state
    assert job.reason == (
        "the migration did not complete while kvm1's worker could not follow it; "
        "test still running on kvm1"
    )
    assert rollbacks == [job_id]
    seen = event_names(store, job_id)
    assert "postcopy.not_found" in seen
    assert not [name for name in seen if name.startswith("postcopy.resum")], seen


def test_recovery_judges_a_guest_gone_from_the_source_as_moved(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    job_id = job_for(store)
    store.update(job_id, facts=recorded("00000000-0000-0000-0000-0000000000aa"))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    assert recover_perform(runtime(store, "kvm1", tmp_path), store.get(job_id)) is True
    job = store.get(job_id)
    assert job.state is JobState.MIGRATING  # the chain goes on with finish
    record = job.phases[Phase.PERFORM.value]
    assert record.ended is not None and record.error is None
    assert rollbacks == []


# --- evacuation planning --------------------------------------------------------------------


def test_planning_reads_the_guests_and_says_why_each_host_is_no_candidate(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    hv.defineXML(IDLE_XML.format(name="idle"))
    rt = runtime(store, "kvm1", tmp_path)
    view = gather(rt, EvacuationSpec(host="kvm1"), "0123456789ab")
    assert [(g.domain, g.memory_mib, g.active) for g in view.guests] == [(GUEST, 8192, True)]
    assert view.candidates == []
    assert view.unavailable == {"kvm2": "its worker is not alive"}

    store.heartbeat("kvm2", 30, "w1")  # alive now, but no facts published yet
    view = gather(rt, EvacuationSpec(host="kvm1", include_inactive=True), "0123456789ab")
    assert sorted(g.domain for g in view.guests) == ["idle", GUEST]
    assert view.unavailable == {
        "kvm2": "no recent facts from its worker (none published, or expired)"
    }
    # Its facts, as a worker on the test driver would publish them: a candidate, no libvirt
    # connection opened to it (the test driver offers no domain capabilities to read).
    cpu = HostCpu(virt_type="test", arch="i686", host_model=True)
    facts = HostFacts(
        host="kvm2", worker="w1", ts=datetime.now(UTC), free_mib=9000, active_mib=0, cpus=[cpu]
    )
    publish_facts(store.r, facts, 30)
    view = gather(rt, EvacuationSpec(host="kvm1"), "0123456789ab")
    assert view.unavailable == {}
    assert [(c.name, c.free_mib, c.cpu_refusals) for c in view.candidates] == [("kvm2", 9000, {})]
    Maintenance(store.r).disable("kvm2", "disk swap", by="test")
    view = gather(rt, EvacuationSpec(host="kvm1"), "0123456789ab")
    assert view.unavailable == {"kvm2": "in maintenance (disk swap)"}
    (placement,) = plan(view.guests, view.candidates, view.unavailable, Estimate(1.0, 100.0))
    assert placement.domain == GUEST and placement.destination is None
    assert placement.reason is not None and "kvm2" in placement.reason


def placed_on_kvm2(hv: libvirt.virConnect) -> Placement:
    """The test guest as a plan places it: running, defined, as libvirt shows it on kvm1."""
    return Placement(
        domain=GUEST,
        uuid=guest_uuid(hv),
        memory_mib=64,
        active=True,
        persistent=True,
        destination="kvm2",
        estimate_s=1.0,
    )


def test_a_plan_read_back_must_match_what_libvirt_shows(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    rt = runtime(store, "kvm1", tmp_path)
    ev = Evacuation.model_construct(spec=EvacuationSpec(host="kvm1"))
    placed = placed_on_kvm2(hv)
    assert _placement_problem(rt, ev, placed) is None
    rewritten = placed.model_copy(update={"uuid": "00000000-0000-0000-0000-0000000000bb"})
    assert "are not what libvirt shows on kvm1" in str(_placement_problem(rt, ev, rewritten))
    elsewhere = placed.model_copy(update={"destination": "kvm9"})
    assert "not a host it may use" in str(_placement_problem(rt, ev, elsewhere))


def recorded_children(monkeypatch: pytest.MonkeyPatch, child: str) -> list[str]:
    """The destinations the watch would queue children for, recorded instead (each queued
    child is `child`); nothing admitted."""
    queued: list[str] = []

    def queue_child(rt: Runtime, ev: Evacuation, placement: Placement, **_: object) -> str:
        queued.append(str(placement.destination))
        return child

    monkeypatch.setattr(evacuation_children, "_queue_child", queue_child)
    monkeypatch.setattr(evacuation_children, "admit_waiting", lambda rt: None)
    return queued


def test_a_failed_child_is_retried_only_as_the_signed_request_and_libvirt_allow(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed child is queued again, and signed by this worker, from the plan kept in
    Redis: a plan rewritten there (another destination, facts libvirt does not show) must be
    refused as it is when the children are first queued, not signed on retry."""
    rt = runtime(store, "kvm1", tmp_path)
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(EvacuationSpec(host="kvm1", to=["kvm2"]), "test")
    placed = placed_on_kvm2(hv)
    failed = job_for(store)
    assert store.transition(failed, JobState.FAILED, host="test", reason="blip")[0]
    queued = recorded_children(monkeypatch, failed)
    for rewritten in (
        placed.model_copy(update={"destination": "kvm1"}),  # back to the evacuated host
        placed.model_copy(update={"persistent": False}),  # not the guest libvirt shows
    ):
        evacuations.save_plan(ev_id, [rewritten])
        assert retry_failed(rt, evacuations, evacuations.get(ev_id), store.get(failed)) is None
    assert queued == []
    evacuations.save_plan(ev_id, [placed])
    assert retry_failed(rt, evacuations, evacuations.get(ev_id), store.get(failed)) is not None
    assert queued == ["kvm2"]


def test_a_retry_count_deleted_from_redis_gives_no_more_retries(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`evacuation_retries` (1) is counted in this host's ledger as well as in Redis: the
    Redis count deleted before every retry (the attacker probe: 83 children queued for one
    domain in 45 s) queues the domain once again, not for ever."""
    rt = runtime(store, "kvm1", tmp_path)
    assert rt.settings.tunables.evacuation_retries == 1
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(EvacuationSpec(host="kvm1", to=["kvm2"]), "test")
    evacuations.save_plan(ev_id, [placed_on_kvm2(hv)])
    failed = job_for(store)
    assert store.transition(failed, JobState.FAILED, host="test", reason="blip")[0]
    queued = recorded_children(monkeypatch, failed)
    for _ in range(3):
        store.r.delete(evacuation_retries_key(ev_id))
        retry_failed(rt, evacuations, evacuations.get(ev_id), store.get(failed))
    assert queued == ["kvm2"]


def test_the_seam_refuses_a_uri_the_registry_does_not_allow(env: Path) -> None:
    with pytest.raises(UnsafeURI, match="refusing libvirt URI"):
        _ = LibvirtHost("qemu+ext:///system?command=/bin/true").conn


def test_recovery_of_an_offline_move_asks_an_unreachable_destination_again(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    """Whether an offline move's definition arrived is the destination's libvirtd's to say.
    One that cannot be reached says nothing: the job is neither failed nor rolled back on
    hearsay (its next recovery asks again), and the guest is left as libvirt has it."""
    job_id = job_for(store, offline=True, live=False, persistent=True)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    rt = runtime(store, "kvm1", tmp_path, peers_unreachable())
    with pytest.raises(LibvirtUnavailable):
        recover_perform(rt, store.get(job_id))
    job = store.get(job_id)
    assert job.state is JobState.MIGRATING and job.reason is None
    assert job.phases[Phase.PERFORM.value].ended is None
    assert rollbacks == []
    assert hv.lookupByName(GUEST).state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_recovery_of_an_offline_move_whose_definition_arrived_goes_on(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path, rollbacks: list[str]
) -> None:
    """The same, with the destination reachable: libvirt shows the definition there (one
    hypervisor plays both hosts), so perform ended and the chain goes on with finish."""
    job_id = job_for(store, offline=True, live=False, persistent=True)
    store.update(job_id, facts=recorded(guest_uuid(hv)))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    assert recover_perform(runtime(store, "kvm1", tmp_path), store.get(job_id)) is True
    job = store.get(job_id)
    assert job.state is JobState.MIGRATING
    assert job.phases[Phase.PERFORM.value].ended is not None
    assert rollbacks == []


@pytest.mark.parametrize("arrived", [False, True], ids=["not there", "defined there"])
def test_recovery_of_an_offline_move_of_a_shut_off_guest_asks_the_destination(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
    rollbacks: list[str],
    arrived: bool,
) -> None:
    """An offline guest is shut off at home before and after its move: that said its move
    had completed, and a job whose migration never reached the destination went on to
    finish (fault probe: it failed there, and libvirt then defined the guest on the
    destination, its source undefined). The destination's word decides."""
    hv.defineXML(IDLE_XML.format(name="idle"))  # defined, not running
    uuid = str(hv.lookupByName("idle").UUIDString())
    job_id = job_for(store, domain="idle", offline=True, live=False, persistent=True)
    shut_off = {"name": "idle", "state": "shutoff", "active": False}
    store.update(job_id, facts=recorded(uuid, **shut_off))
    walked(store, job_id, JobState.MIGRATING)
    store.phase_started(job_id, Phase.PERFORM.value, "kvm1")
    rt = runtime(store, "kvm1", tmp_path, None if arrived else destination_empty(tmp_path))

    assert recover_perform(rt, store.get(job_id)) is arrived
    job = store.get(job_id)
    if arrived:  # one hypervisor plays both hosts: the definition is there
        assert job.state is JobState.MIGRATING and rollbacks == []
        assert job.phases[Phase.PERFORM.value].ended is not None
    else:
        assert job.state is JobState.FAILED, job.state
        assert job.reason is not None and "did not complete" in job.reason, job.reason
        assert rollbacks == [job_id]
    assert hv.lookupByName("idle").isPersistent()  # left as libvirt has it


# --- an evacuation's end ----------------------------------------------------------------------

GONE_UUID = "00000000-0000-0000-0000-0000000000ee"  # a guest no longer on the evacuated host


def moved_child(store: JobStore, tmp: Path, destination_reachable: bool) -> tuple[Runtime, str]:
    """kvm1's evacuation, its one child succeeded and its guest gone from kvm1 (the test
    hypervisor has no such uuid), on the runtime of kvm1's worker; kvm2's libvirtd reachable
    (the same test hypervisor, which has no such guest either) or not."""
    evacuations = EvacuationStore(store)
    ev_id = evacuations.create(EvacuationSpec(host="kvm1", to=["kvm2"]), "test")
    evacuations.transition(ev_id, EvacuationState.PLANNING)
    placed = Placement(
        domain="gone", uuid=GONE_UUID, memory_mib=64, active=True, persistent=True,
        destination="kvm2", estimate_s=1.0,
    )  # fmt: skip
    evacuations.save_plan(ev_id, [placed])
    evacuations.transition(ev_id, EvacuationState.RUNNING)
    spec = MigrationSpec(domain="gone", src="kvm1", dst="kvm2", live=True)
    child = store.create(spec, host="kvm1", parent=ev_id)
    walked(store, child, JobState.MIGRATING)
    store.transition(child, JobState.FINISHING, host="kvm2")
    assert store.transition(child, JobState.SUCCEEDED, host="kvm1")[0]
    libvirt_host = seam() if destination_reachable else peers_unreachable()
    return runtime(store, "kvm1", tmp, libvirt_host), ev_id


@contextmanager
def bind_log(store: JobStore, host: str) -> Iterator[None]:
    """The process-wide event chain as `host`'s worker sets it up, writing to `store`."""
    old = structlog.get_config()
    events.configure(host, store.without_retry, stream=io.StringIO())
    try:
        yield
    finally:
        structlog.configure(**old)


def event_names(store: JobStore, ev_id: str) -> list[str]:
    return [e["event"] for _, e in store.read_events(ev_id)]


def test_an_evacuation_asks_an_unreachable_destination_again_before_it_ends(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """Every child succeeded and the guest is gone from kvm1, but kvm2's libvirtd cannot be
    asked where it is: the evacuation is neither drained nor partial yet; it says so once
    and asks again at the next checks."""
    rt, ev_id = moved_child(store, tmp_path, destination_reachable=False)
    evacuations = EvacuationStore(store)
    with bind_log(store, "kvm1"):
        for _ in range(3):
            check(rt, ev_id)
    ev = evacuations.get(ev_id)
    assert ev.state is EvacuationState.RUNNING and not ev.outcome
    assert event_names(store, ev_id).count("evacuation.confirm_deferred") == 1


def test_an_evacuation_whose_destination_stays_unreachable_ends_partial_saying_so(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """After `evacuation_confirm_wait` it ends: partial, and its reason says that kvm2 could
    not be asked, never that libvirt showed the guest nowhere."""
    env.write_text(env.read_text() + "\n[tunables]\nevacuation_confirm_wait = 0\n")
    rt, ev_id = moved_child(store, tmp_path, destination_reachable=False)
    check(rt, ev_id)
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.PARTIAL
    assert ev.reason is not None and "kvm2's libvirtd could not be asked" in ev.reason
    assert "cannot reach qemu+tcp://192.0.2.2/system" in ev.reason
    assert "neither here nor" not in ev.reason
    (outcome,) = ev.outcome
    assert (outcome.moved, outcome.on_source, outcome.running_on) == (False, False, None)
    assert outcome.destination_unreachable is not None


def test_a_time_written_into_redis_cannot_hold_an_evacuation_open(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """The wait is timed by the worker's own clock: a child's end rewritten into the far
    future (anyone with the Redis password can) does not keep the evacuation waiting."""
    env.write_text(env.read_text() + "\n[tunables]\nevacuation_confirm_wait = 0\n")
    rt, ev_id = moved_child(store, tmp_path, destination_reachable=False)
    (child,) = EvacuationStore(store).get(ev_id).children.values()
    store.r.hset(job_key(child), "updated", "9999-01-01T00:00:00+00:00")
    store.r.hset(job_key(ev_id), "updated", "9999-01-01T00:00:00+00:00")
    check(rt, ev_id)
    assert EvacuationStore(store).get(ev_id).state is EvacuationState.PARTIAL


def test_an_evacuation_whose_destination_shows_the_guest_nowhere_says_that(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    """kvm2's libvirtd answers, and has no such guest: that is what the reason says, at once."""
    rt, ev_id = moved_child(store, tmp_path, destination_reachable=True)
    check(rt, ev_id)
    ev = EvacuationStore(store).get(ev_id)
    assert ev.state is EvacuationState.PARTIAL
    assert ev.reason is not None and "libvirt shows it neither here nor on kvm2" in ev.reason
    (outcome,) = ev.outcome
    assert outcome.destination_unreachable is None
