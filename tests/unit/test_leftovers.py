"""A destination's rollback that could not finish when its job ended is finished later.

Seen on the lab: a `--copy-storage` job failed while the destination's libvirtd was down;
its rollback gave up after its tries, the image it had made stayed, and the next migration
of that guest there failed ("... already exists") until someone removed the file by hand.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.model import Job
from jobs.phases import Phase
from jobs.record import SourceFacts
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, job_key
from worker import leftovers
from worker.ledger import Ledger
from worker.leftovers import sweep_leftovers
from worker.libvirt_host import LibvirtHost, LibvirtUnavailable
from worker.phase_errors import PhaseFailed
from worker.rollback import rollback_destination
from worker.runtime import Runtime

TEST_URI = "test:///default"
LONG_AGO = "2020-01-01T00:00:00+00:00"


@pytest.fixture
def images(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kvm2's storage directory, a temporary one (a rollback removes only under it)."""
    made = tmp_path / "images"
    made.mkdir()
    text = config.read_text().replace(
        "[hosts.kvm2]\n", f'[hosts.kvm2]\nstorage_dirs = ["{made}"]\n', 1
    )
    config.write_text(text)
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    return made


@pytest.fixture
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as seen:
        yield seen


# kvm1, the source, as its libvirtd shows it: a test driver of its own, running web01 (a
# rollback removes the images it made only while the source runs the guest itself).
SOURCE_UUID = "6f1c5a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"
SOURCE_NODE = f"""<node>
  <domain type='test'>
    <name>web01</name><uuid>{SOURCE_UUID}</uuid>
    <memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  </domain>
</node>"""


def runtime(store: JobStore, tmp_path: Path, *, libvirtd_up: bool = True) -> Runtime:
    source = tmp_path / "kvm1.xml"
    source.write_text(SOURCE_NODE)

    def opener(uri: str) -> libvirt.virConnect:
        if not libvirtd_up:
            raise libvirt.libvirtError("Failed to connect socket: No such file or directory")
        return libvirt.open(TEST_URI if uri == TEST_URI else f"test://{source}")

    host = LibvirtHost(TEST_URI, opener=opener)
    return Runtime("kvm2", store, host, Ledger(str(tmp_path / "ledger")))


def ended_with_an_image(
    rt: Runtime, images: Path, state: JobState, *, when: str = LONG_AGO
) -> tuple[str, Path]:
    """A job that made an image on kvm2 and ended `state` (at `when`) without its rollback."""
    store = rt.store
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="test")
    image = images / f"{job_id}.qcow2"
    image.write_text("made by prepare")
    rt.ledger.record_image(job_id, str(image))
    facts = {"name": "web01", "uuid": SOURCE_UUID, "state": "running", "active": True}
    seen = facts | {"persistent": True, "memory_mib": 64, "vcpus": 1}
    rt.ledger.remember_facts(job_id, SourceFacts.model_validate(seen))
    walk = [JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING]
    if state is JobState.SUCCEEDED:
        walk.append(JobState.FINISHING)
        assert rt.ledger.claim(job_id, Phase.FINISH.value)  # drover's success: finish ran here
    for step in [*walk, state]:
        moved, _ = store.transition(job_id, step, host="test", reason="a fault")
        assert moved, step
    store.r.hset(job_key(job_id), "updated", when)
    return job_id, image


def test_the_rollback_of_an_ended_job_is_finished_once_libvirtd_answers(
    store: JobStore, images: Path, tmp_path: Path, events: list[MutableMapping[str, Any]]
) -> None:
    down = runtime(store, tmp_path, libvirtd_up=False)
    job_id, image = ended_with_an_image(down, images, JobState.FAILED)
    sweep_leftovers(down)  # libvirtd still down: nothing is done yet
    assert image.exists() and down.ledger.images(job_id) == [str(image)]

    up = runtime(store, tmp_path)
    sweep_leftovers(up)
    assert not image.exists()
    assert up.ledger.jobs_with_leftovers() == []
    said = [e["event"] for e in events]
    assert "rollback.resumed" in said and "rollback.removed_images" in said


@pytest.mark.parametrize(
    ("state", "when"),
    [
        (JobState.SUCCEEDED, LONG_AGO),  # its guest arrived: never rolled back
        (JobState.FAILED, None),  # just ended: its own rollback may still be on its way
    ],
    ids=["succeeded", "just-ended"],
)
def test_a_job_whose_rollback_is_not_due_keeps_its_image(
    store: JobStore, images: Path, tmp_path: Path, state: JobState, when: str | None
) -> None:
    rt = runtime(store, tmp_path)
    job_id, image = ended_with_an_image(rt, images, state, when=when or _now())
    sweep_leftovers(rt)
    assert image.exists() and rt.ledger.images(job_id) == [str(image)]


def test_a_live_job_is_never_rolled_back(store: JobStore, images: Path, tmp_path: Path) -> None:
    rt = runtime(store, tmp_path)
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="test")
    image = images / "live.qcow2"
    image.write_text("made by prepare")
    rt.ledger.record_image(job_id, str(image))
    store.r.hset(job_key(job_id), "updated", LONG_AGO)
    sweep_leftovers(rt)
    assert image.exists()


def _now() -> str:
    from jobs.store import now

    return now().isoformat()


def test_one_jobs_libvirt_error_does_not_keep_the_others_leftovers(
    store: JobStore,
    images: Path,
    tmp_path: Path,
    events: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jobs are swept in id order, every pass: a job whose rollback libvirt refuses each time
    (its own domain's error, not the daemon gone) must not keep the jobs after it from
    theirs for ever."""
    rt = runtime(store, tmp_path)
    made = sorted(ended_with_an_image(rt, images, JobState.FAILED) for _ in range(2))
    (stuck, stuck_image), (other, other_image) = made
    real = rollback_destination

    def rollback(rt: Runtime, job: Job) -> None:
        if job.id == stuck:
            raise libvirt.libvirtError("Requested operation is not valid: domain is locked")
        real(rt, job)

    monkeypatch.setattr(leftovers, "rollback_destination", rollback)
    sweep_leftovers(rt)
    assert not other_image.exists() and rt.ledger.images(other) == []
    assert stuck_image.exists() and rt.ledger.jobs_with_leftovers() == [stuck]
    retrying = [e for e in events if e["event"] == "rollback.retrying"]
    assert len(retrying) == 1 and "domain is locked" in retrying[0]["reason"]


def test_a_libvirtd_gone_mid_pass_ends_the_pass(
    store: JobStore, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon itself unreachable: the other jobs would fail alike; the next pass,
    once it answers, takes them all."""
    rt = runtime(store, tmp_path)
    made = sorted(ended_with_an_image(rt, images, JobState.FAILED) for _ in range(2))
    calls: list[str] = []

    def rollback(rt: Runtime, job: Job) -> None:
        calls.append(job.id)
        raise LibvirtUnavailable("libvirtd on kvm2 is unreachable")

    monkeypatch.setattr(leftovers, "rollback_destination", rollback)
    sweep_leftovers(rt)
    assert calls == [made[0][0]]
    assert all(image.exists() for _, image in made)


@pytest.mark.parametrize("forged", [JobState.SUCCEEDED, JobState.CHECKED])
def test_an_end_written_for_a_job_whose_finish_never_ran_here_is_rolled_back(
    store: JobStore, images: Path, tmp_path: Path, forged: JobState
) -> None:
    """Attacker probe: `succeeded` (or `checked`) written into a job prepared here kept its
    booking, and the host's room, for good (the record had no end to expire it by)."""
    rt = runtime(store, tmp_path)
    job_id, image = ended_with_an_image(rt, images, JobState.FAILED)
    rt.ledger.book(job_id, 64)
    store.r.hset(job_key(job_id), mapping={"state": forged.value, "updated": LONG_AGO})
    sweep_leftovers(rt)
    assert not image.exists() and rt.ledger.jobs_with_leftovers() == []
    assert rt.ledger.booked_jobs("") == []


def test_a_guest_that_arrived_under_an_end_is_not_rolled_back(
    store: JobStore,
    images: Path,
    tmp_path: Path,
    events: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attacker probe: its rollback dropped the ledger's rows of a guest that had arrived
    here under a record written `failed`, and nothing could take the job back up any more.
    Now it is taken back up (worker/contradicted_end.py), or, its request not signed, left."""
    rt = runtime(store, tmp_path)
    job_id, image = ended_with_an_image(rt, images, JobState.FAILED)
    monkeypatch.setattr(leftovers, "_running_here", lambda _rt, _job: True)
    monkeypatch.setattr(leftovers, "arrived_here", lambda _rt, _job: True)
    monkeypatch.setattr(leftovers, "reopened", lambda _rt, _job, _phase: None)
    sweep_leftovers(rt)
    assert image.exists() and rt.ledger.jobs_with_leftovers() == [job_id]
    (refused,) = [e for e in events if e["event"] == "rollback.refused"]
    assert "arrived" in refused["reason"]
    assert "rollback.resumed" not in [e["event"] for e in events]


# web01 as it arrived on kvm2 (the destination's test driver) and as its source now shows it:
# shut off, migrated away.
ARRIVED = f"""<domain type='test'>
  <name>web01</name><uuid>{SOURCE_UUID}</uuid>
  <memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>
</domain>"""
LEFT_SOURCE = f"""<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>web01</name><uuid>{SOURCE_UUID}</uuid>
    <memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>"""


@pytest.fixture
def arrived(tmp_path: Path) -> Iterator[libvirt.virDomain]:
    """web01 running on kvm2 (test:///default, shared by the process: destroyed after), and
    kvm1 showing it shut off."""
    (tmp_path / "kvm1.xml").write_text(LEFT_SOURCE)
    conn = libvirt.open(TEST_URI)
    dom = conn.createXML(ARRIVED)
    yield dom
    dom.destroy()
    conn.close()


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused-on-arrival"])
def test_a_guest_that_landed_under_a_written_end_keeps_what_finish_needs(
    store: JobStore,
    images: Path,
    tmp_path: Path,
    events: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    arrived: libvirt.virDomain,
    paused: bool,
) -> None:
    """Attacker probe: a `--suspend` migration lands paused; with its record written `failed`
    mid-migration, the sweep took the arrival for a copy still coming in and rolled it back:
    the ledger's rows went, and nothing could take the job back up. A paused arrival is an
    arrival; and the rollback itself, finding the guest landed while this host's finish never
    ran, refuses (its libvirt calls may have waited out the landing)."""
    rt = runtime(store, tmp_path)
    (tmp_path / "kvm1.xml").write_text(LEFT_SOURCE)  # runtime() wrote a running source
    job_id, image = ended_with_an_image(rt, images, JobState.FAILED)
    assert rt.ledger.claim(job_id, Phase.DESTINATION_PREPARE.value)
    assert rt.ledger.take_incoming(SOURCE_UUID, job_id, lambda _job: False) is None
    if paused:
        arrived.suspend()
    assert leftovers._running_here(rt, store.get(job_id))
    with pytest.raises(PhaseFailed, match="arrived on kvm2, brought in by this job"):
        rollback_destination(rt, store.get(job_id))
    monkeypatch.setattr(leftovers, "reopened", lambda _rt, _job, _phase: None)  # unsigned
    sweep_leftovers(rt)
    assert image.exists() and rt.ledger.incoming_uuid(job_id) == SOURCE_UUID
    assert arrived.isActive()
    (refused,) = [e for e in events if e["event"] == "rollback.refused"]
    assert "arrived" in refused["reason"]


def test_a_refused_rollback_is_said_once_not_at_every_pass(
    store: JobStore,
    images: Path,
    tmp_path: Path,
    events: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attacker probe: two lines a pass for as long as the copy came in."""
    rt = runtime(store, tmp_path)
    ended_with_an_image(rt, images, JobState.FAILED)

    def coming_in(_rt: Runtime, _job: Job) -> None:
        raise PhaseFailed("web01 on kvm2 is paused (migration): still coming in")

    monkeypatch.setattr(leftovers, "rollback_destination", coming_in)
    for _ in range(3):
        sweep_leftovers(rt)
    said = [e["event"] for e in events if e["event"].startswith("rollback.")]
    assert said == ["rollback.resumed", "rollback.refused"]
