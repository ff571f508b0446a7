"""Evacuation planning against a set of live evacuations written by hand (anyone with the
Redis password): a member drover did not write is skipped and said, a child whose state
cannot be read still counts as on its way, and a set that is not a set leaves the groups on
their way unknown: no guest of an anti-affinity group is placed (a limit refused, never
ignored), the others are. Against the real test Redis and libvirt's test driver."""

from __future__ import annotations

from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import libvirt
from structlog.testing import capture_logs

from jobs.evacuation import ACTIVE_EVACUATIONS, EvacuationSpec, EvacuationStore, Placement
from jobs.keys import children_key, job_key
from jobs.store import JobStore
from tests.unit import test_libvirt_seam as seam
from worker.evacuation_plan import planned
from worker.fleet_view import FleetView, gather, groups_on_the_way
from worker.placement import Candidate, Guest

env = seam.env
hv = seam.hv


def said(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def placed(domain: str) -> Placement:
    return Placement(
        domain=domain,
        uuid=f"uuid-{domain}",
        memory_mib=64,
        active=True,
        persistent=True,
        group="db",
        destination="kvm2",
    )


def test_junk_members_and_unreadable_children_stop_no_planning(
    env: Path, store: JobStore, tmp_path: Path
) -> None:
    evacuations = EvacuationStore(store)
    other = evacuations.create(EvacuationSpec(host="kvm3"), "test")
    evacuations.save_plan(other, [placed("db1"), placed("db2")])
    store.r.hset(children_key(other), mapping={"db1": "nosuchjob", "db2": "badjob"})
    store.r.set(job_key("badjob"), "x")  # a child's record of another type
    store.r.sadd(ACTIVE_EVACUATIONS, "junk", "x" * 500)
    rt = seam.runtime(store, "kvm1", tmp_path)

    with capture_logs() as logs:
        heading = groups_on_the_way(rt, "0123456789ab")  # JobNotFound, WRONGTYPE before

    assert heading.unknown is None
    assert heading.groups == {"kvm2": Counter({"db": 2})}  # unknown children count
    skipped = said(logs, "record.unreadable")
    assert sorted(e["field"] for e in skipped) == ["junk", "x" * 32 + "..."]
    assert all(e["key"] == ACTIVE_EVACUATIONS for e in skipped)


def test_a_live_set_that_is_no_set_places_no_guest_of_a_group(
    env: Path, store: JobStore, hv: libvirt.virConnect, tmp_path: Path
) -> None:
    evacuations = EvacuationStore(store)
    ev = evacuations.get(evacuations.create(EvacuationSpec(host="kvm1"), "test"))
    store.r.delete(ACTIVE_EVACUATIONS)
    store.r.set(ACTIVE_EVACUATIONS, "x")
    rt = seam.runtime(store, "kvm1", tmp_path)

    with capture_logs() as logs:
        view = gather(rt, ev.spec, ev.id)  # KeyUnreadable before: no planning at all
    (entry,) = said(logs, "record.unreadable")
    assert entry["key"] == ACTIVE_EVACUATIONS and "is a string, not a set" in entry["reason"]
    assert view.groups_unknown is not None

    guests = [
        Guest("db1", "u1", 64, active=True, persistent=True, group="db"),
        Guest("web1", "u2", 64, active=True, persistent=True),
    ]
    fleet = FleetView(guests, {}, [Candidate("kvm2", 8192)], {}, view.groups_unknown)
    by_domain = {p.domain: p for p in planned(rt, ev, fleet)}
    assert by_domain["web1"].destination == "kvm2"
    assert by_domain["db1"].destination is None
    assert "anti-affinity groups on their way cannot be known" in (by_domain["db1"].reason or "")
