"""Bookings written by hand into a host's reservations (anyone with the Redis password:
`HSET drover:host:kvm2:reservations deadbeef0000 1000000`) count for nothing unless their
job is live and headed for that host: the host keeps its room for the destination's prepare,
its report and every planner; they are said once per reading, and those of a job that has
ended or never was are removed (no job's end would ever remove them). A live job's own
booking is never removed. Against the real test Redis (and libvirt's test driver)."""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.evacuation import EvacuationSpec
from jobs.host_facts import HostCpu, publish_facts
from jobs.keys import job_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, reservations_key
from tests.unit import test_libvirt_seam as seam
from tests.unit.test_facts_placement import facts_for
from tests.unit.test_hostile_fleet_keys_reservations import Memory
from worker import keeper
from worker.destination_room import memory_refusal, take_room
from worker.fleet_view import gather

env = seam.env
hv = seam.hv
FORGED = "deadbeef0000"  # looks like a job id drover makes; no such job
KVM2 = reservations_key("kvm2")


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def booked(store: JobStore, domain: str, dst: str = "kvm2", mib: int = 64) -> str:
    """A live job kvm1 -> `dst` whose destination booked `mib` there, as prepare does."""
    job_id = store.create(MigrationSpec(domain=domain, src="kvm1", dst=dst), host="test")
    store.transition(job_id, JobState.PREFLIGHT, host="test")
    assert store.reserve(dst, job_id, mib)
    return job_id


def test_a_booking_no_job_made_counts_for_nothing_and_goes(store: JobStore) -> None:
    live = booked(store, "web01")
    store.r.hset(KVM2, FORGED, "1000000")
    with capture_logs() as logs:
        assert store.reserved_mib("kvm2") == 64  # 1000064 before: the host full for good
        assert store.reserved_mib("kvm2") == 64
    assert store.r.hgetall(KVM2) == {live: "64"}  # the live job's booking kept
    (entry,) = said(logs, "reservation.ignored")  # the second reading found it gone
    assert entry["key"] == KVM2 and entry["ignored"] == entry["removed"] == 1
    assert f"'{FORGED}': no such job" in entry["reason"]


def test_bookings_of_an_ended_job_or_for_another_host_count_for_nothing(
    store: JobStore,
) -> None:
    ended = booked(store, "web01")
    store.transition(ended, JobState.FAILED, host="test", reason="x")
    elsewhere = booked(store, "web02", dst="kvm3")
    history = f"{ended}:transitions"  # names a list: its "record" is no hash
    store.r.hset(KVM2, mapping={ended: "4096", elsewhere: "4096", history: "4096"})
    with capture_logs() as logs:
        assert store.reserved_mib("kvm2") == 0  # 12288 before
    (entry,) = said(logs, "reservation.ignored")
    assert entry["ignored"] == 3 and entry["removed"] == 2
    assert "its job has ended (failed)" in entry["reason"]
    assert "its spec sends it to 'kvm3', not kvm2" in entry["reason"]
    assert store.r.hgetall(KVM2) == {elsewhere: "4096"}  # a live job's: not removed here

    store.transition(elsewhere, JobState.FAILED, host="test", reason="x")
    assert store.reserved_mib("kvm2") == 0 and store.r.exists(KVM2) == 0  # gone once ended


def test_the_destination_still_takes_a_guest(env: Path, store: JobStore, tmp_path: Path) -> None:
    job_id = booked(store, "web01")
    store.r.hset(KVM2, FORGED, "1000000")
    rt = seam.runtime(store, "kvm2", tmp_path)
    rt.libvirt = cast(Any, SimpleNamespace(conn=Memory(8192)))
    # "kvm2 has 0 MiB free, web01 needs 64 MiB" before: every migration to kvm2 refused
    assert memory_refusal(rt, store.get(job_id), 64) is None


def test_the_host_report_and_the_planner_see_the_room(
    env: Path,
    store: JobStore,
    hv: libvirt.virConnect,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    facts = facts_for("kvm2", free=8192, cpu=HostCpu(virt_type="test", arch="i686"))
    monkeypatch.setattr(keeper, "collect_facts", lambda *_: facts)
    store.r.hset(KVM2, FORGED, "1000000")
    _, report = keeper.host_report(seam.runtime(store, "kvm2", tmp_path))
    assert report["free_mib"] == 8192 and report["reserved_mib"] == 0  # 0 free before

    store.r.hset(KVM2, FORGED, "1000000")
    store.heartbeat("kvm2", 30, "w1")
    publish_facts(store.r, facts, 30)
    view = gather(seam.runtime(store, "kvm1", tmp_path), EvacuationSpec(host="kvm1"), "0" * 12)
    assert [(c.name, c.free_mib) for c in view.candidates] == [("kvm2", 8192)]


def test_a_refusal_for_unreadable_reservations_says_why(
    env: Path, store: JobStore, tmp_path: Path
) -> None:
    job_id = booked(store, "web01", dst="kvm2")
    store.r.delete(KVM2)
    store.r.set(KVM2, "0")
    rt = seam.runtime(store, "kvm2", tmp_path)
    rt.libvirt = cast(Any, SimpleNamespace(conn=Memory(8192)))
    refusal = memory_refusal(rt, store.get(job_id), 64) or ""
    assert refusal.startswith("kvm2 has 0 MiB free (drover:host:kvm2:reservations is a string")
    assert refusal.endswith("counts as no room), web01 needs 64 MiB") and "\n" not in refusal


def test_a_live_booking_deleted_from_redis_still_holds_the_room(
    env: Path, store: JobStore, tmp_path: Path
) -> None:
    """The destination books in its own ledger too (worker/ledger.py): deleting (or lowering)
    a live job's booking in Redis, by hand, no longer lets a second guest in on memory the
    first is still taking. An ended job's ledger booking holds until this host releases it."""
    rt = seam.runtime(store, "kvm2", tmp_path)
    first = booked(store, "web01", mib=6000)
    rt.ledger.book(first, 6000)  # as destination_prepare books, before Redis
    second = store.create(MigrationSpec(domain="web02", src="kvm1", dst="kvm2"), host="test")
    store.transition(second, JobState.PREFLIGHT, host="test")  # in its checks: no booking yet
    rt.libvirt = cast(Any, SimpleNamespace(conn=Memory(8192)))
    expected = "kvm2 has 2192 MiB free, web02 needs 4096 MiB"
    assert memory_refusal(rt, store.get(second), 4096) == expected
    store.r.hdel(KVM2, first)  # the forger's move: 8192 MiB free before
    assert memory_refusal(rt, store.get(second), 4096) == expected
    store.r.hset(KVM2, first, "1")  # lowered rather than deleted: the same
    assert memory_refusal(rt, store.get(second), 4096) == expected
    assert memory_refusal(rt, store.get(first), 6000) is None  # its own booking not counted
    store.transition(first, JobState.FAILED, host="test", reason="test")
    # Ended: held until this host's rollback releases it (the record's word is not enough).
    assert memory_refusal(rt, store.get(second), 4096) == expected
    assert rt.ledger.jobs_with_leftovers() == [first]  # for the keeper's rollback to release
    rt.ledger.release_booking(first)  # as the rollback does
    assert memory_refusal(rt, store.get(second), 4096) is None
    assert rt.ledger.jobs_with_leftovers() == []


class Incoming:
    """A domain as libvirt shows it: active or not."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def isActive(self) -> bool:
        return self.active


def test_a_live_job_written_ended_keeps_its_booking_until_this_host_releases_it(
    env: Path, store: JobStore, tmp_path: Path
) -> None:
    """The probe: `HSET drover:job:J state succeeded` (and the Redis booking deleted) while J
    was about to migrate let a second guest onto a full host. A booking holds whatever the
    record says; once no record is left, while libvirt runs the guest it was for here."""
    rt = seam.runtime(store, "kvm2", tmp_path)
    first = booked(store, "web01", mib=6000)
    rt.ledger.book(first, 6000)
    assert rt.ledger.take_incoming("u-web01", first, lambda _: False) is None
    second = store.create(MigrationSpec(domain="web02", src="kvm1", dst="kvm2"), host="test")
    store.transition(second, JobState.PREFLIGHT, host="test")
    shown: dict[str, Incoming] = {}  # the source has not started the migration yet
    rt.libvirt = cast(Any, SimpleNamespace(conn=Memory(8192), by_uuid=shown.get))
    store.r.hdel(KVM2, first)
    expected = "kvm2 has 2192 MiB free, web02 needs 4096 MiB"
    for forged in ("succeeded", "failed", "cancelled"):
        store.r.hset(job_key(first), "state", forged)
        assert memory_refusal(rt, store.get(second), 4096) == expected, forged
    store.r.delete(job_key(first))  # no record left: libvirt decides
    shown["u-web01"] = Incoming(active=True)
    assert memory_refusal(rt, store.get(second), 4096) == expected
    shown["u-web01"].active = False
    assert memory_refusal(rt, store.get(second), 4096) is None


class Crowded(Memory):
    """A libvirtd whose memory reading waits for a second reader to arrive (up to a
    deadline): two room checks made at once both read the room before either books."""

    WAIT_S = 1.0

    def __init__(self, free_mib: int) -> None:
        super().__init__(free_mib)
        self.readers = 0
        self.both = threading.Event()
        self.lock = threading.Lock()

    def getMemoryStats(self, cell: int) -> dict[str, int]:
        with self.lock:
            self.readers += 1
            if self.readers >= 2:
                self.both.set()
        self.both.wait(self.WAIT_S)
        return super().getMemoryStats(cell)


def test_two_guests_arriving_at_once_do_not_both_take_the_last_room(
    env: Path, store: JobStore, tmp_path: Path
) -> None:
    """Room for one 64 MiB guest; two destination prepares check it at the same moment, as
    the worker's threads run them. One books it, the other is refused: both fit before."""
    first, second = (
        store.create(MigrationSpec(domain=d, src="kvm1", dst="kvm2"), host="test")
        for d in ("web01", "web02")
    )
    for job_id in (first, second):
        store.transition(job_id, JobState.PREFLIGHT, host="test")
    rt = seam.runtime(store, "kvm2", tmp_path)
    rt.libvirt = cast(Any, SimpleNamespace(conn=Crowded(100)))
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda j: take_room(rt, store.get(j), 64), [first, second]))
    refused = [v for v in verdicts if v is not None]
    assert len(refused) == 1 and "needs 64 MiB" in refused[0], verdicts
    assert [mib for _, mib in rt.ledger.booked_jobs("")] == [64]  # one booking here, not two
