"""A host's reservations key SET by hand to another type than the hash drover writes (anyone
with the Redis password): what is booked there cannot be known, so the host has no room
(nothing is placed there), that is said once per reading, and the host's report, its memory
checks, the planner's view of the fleet and every other host carry on. Against the real
test Redis."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import libvirt
import pytest
from structlog.testing import capture_logs

from jobs.evacuation import EvacuationSpec
from jobs.host_facts import HostCpu, publish_facts, read_facts
from jobs.record_read import KeyUnreadable
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore, reservations_key
from tests.unit import test_libvirt_seam as seam
from tests.unit.test_facts_placement import facts_for
from worker import keeper
from worker.fleet_view import gather
from worker.host_memory import placement_room_mib

env = seam.env
hv = seam.hv
KIB_PER_MIB = 1024


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def hand_written(store: JobStore, host: str, kind: str) -> None:
    key = reservations_key(host)
    store.r.delete(key)
    if kind == "string":
        store.r.set(key, "0")
    else:
        store.r.rpush(key, "job", "-1000000")


class Memory:
    """What placement_room_mib asks of a libvirtd: its memory and its running domains."""

    def __init__(self, free_mib: int) -> None:
        self.free_mib = free_mib

    def getMemoryStats(self, cell: int) -> dict[str, int]:
        return {"free": self.free_mib * KIB_PER_MIB}

    def listAllDomains(self, flags: int = 0) -> list[object]:
        return []


@pytest.mark.parametrize("kind", ["string", "list"])
def test_a_host_whose_reservations_are_no_hash_has_no_room_and_says_so(
    store: JobStore, kind: str
) -> None:
    hand_written(store, "kvm2", kind)
    a = store.create(MigrationSpec(domain="a", src="kvm2", dst="kvm1"), host="test")
    store.transition(a, JobState.PREFLIGHT, host="test")
    assert store.reserve("kvm1", a, 64)  # a live job's booking on another host
    with capture_logs() as logs:
        reserved = store.reserved_mib("kvm2", excluding=a)  # WRONGTYPE before
        assert placement_room_mib(Memory(65_536), reserved, None) == 0  # type: ignore[arg-type]
        assert placement_room_mib(Memory(65_536), reserved, 32_768) == 0  # type: ignore[arg-type]
    assert reserved is None and store.reserved_mib("kvm1") == 64  # another host, as it was
    (entry,) = said(logs, "record.unreadable")
    assert entry["key"] == reservations_key("kvm2")
    assert f"is a {kind}, not a hash" in entry["reason"] and "no room" in entry["reason"]


def test_booking_and_giving_back_on_a_reservations_key_of_another_type(store: JobStore) -> None:
    job_id = store.create(MigrationSpec(domain="a", src="kvm1", dst="kvm2"), host="test")
    store.transition(job_id, JobState.PREFLIGHT, host="test")
    hand_written(store, "kvm2", "string")
    with pytest.raises(KeyUnreadable, match="drover:host:kvm2:reservations is a string"):
        store.reserve("kvm2", job_id, 64)
    store.release_holds(job_id)  # WRONGTYPE before: the recovery sweep failed on this job
    assert store.r.get(reservations_key("kvm2")) == "0"  # left as it was found


def test_the_report_of_a_host_whose_reservations_are_no_hash_still_stands(
    env: Path, store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = seam.runtime(store, "kvm2", tmp_path)
    facts = facts_for("kvm2", free=8192, groups=("db",))
    monkeypatch.setattr(keeper, "collect_facts", lambda *_: facts)
    hand_written(store, "kvm2", "string")
    (report,) = [d for d in keeper.duties() if d.name == "report"]
    duties = keeper.Keeper(rt, "test-keeper", [report])

    with capture_logs() as logs:
        duties.run_due()
        report.due = 0.0
        duties.run_due()

    assert said(logs, "keeper.redis_unavailable") == [] and said(logs, "keeper.error") == []
    assert len(said(logs, "record.unreadable")) == 2  # once per pass
    shown = store.host_report("kvm2")
    assert shown["free_mib"] == 0 and shown["reserved_mib"] is None
    assert shown["running"] == ["kvm2-db"]
    assert "is a string, not a hash" in shown["reservations_error"]
    assert read_facts(store.r, ["kvm2"], 60, 5)["kvm2"] == facts  # published for planners


def test_the_planner_counts_such_a_host_out_with_why(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    rt = seam.runtime(store, "kvm1", tmp_path)
    store.heartbeat("kvm2", 30, "w1")
    publish_facts(store.r, facts_for("kvm2", cpu=HostCpu(virt_type="test", arch="i686")), 30)
    hand_written(store, "kvm2", "list")
    with capture_logs() as logs:
        view = gather(rt, EvacuationSpec(host="kvm1"), "0123456789ab")  # WRONGTYPE before
    assert view.candidates == []
    assert "is a list, not a hash" in view.unavailable["kvm2"]
    assert "no room" in view.unavailable["kvm2"]
    assert len(said(logs, "record.unreadable")) == 1
