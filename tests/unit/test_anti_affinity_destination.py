"""A guest's anti-affinity group, judged by the destination's prepare on its own libvirtd.

The planner places by each host's published facts, which anyone with the Redis password can
rewrite (a lab saw `drover:worker:lab2:facts` re-SET without its `web` domains every 20 ms,
and an evacuation then put a second `web` guest on lab2); a plain migration never consulted
groups at all. The destination now reads the arriving guest's group from the source's libvirtd
and refuses when a domain of that group runs on its own.

libvirt's test driver plays both hosts: the source is `test:///default`, the destination a
test node of its own (an empty one, its domains made here), so the two hold different guests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit.test_libvirt_seam import EMPTY_NODE_XML, TEST_URI, env, hv, recorded, runtime
from worker.domain_metadata import PLACEMENT_NS
from worker.libvirt_host import LibvirtHost
from worker.phase_destination import destination_prepare
from worker.phase_errors import PhaseFailed
from worker.runtime import Runtime

__all__ = ["env", "hv"]  # fixtures, used by name

GROUPED_XML = """<domain type='test'><name>{name}</name><memory>65536</memory>
<metadata><drover:placement xmlns:drover='{ns}' group='{group}'/></metadata>
<os><type>hvm</type></os></domain>"""


def grouped(name: str, group: str = "web") -> str:
    return GROUPED_XML.format(name=name, ns=PLACEMENT_NS, group=group)


@pytest.fixture
def dest(store: JobStore, tmp_path: Path) -> Iterator[Runtime]:
    """kvm2's worker: its own libvirtd a test node of its own, its peers `test:///default`."""
    node = tmp_path / "kvm2-node.xml"
    node.write_text(EMPTY_NODE_XML)
    seam = LibvirtHost(
        TEST_URI,
        opener=lambda uri: libvirt.open(f"test://{node}" if uri == TEST_URI else TEST_URI),
    )
    rt = runtime(store, "kvm2", tmp_path, seam)
    yield rt
    rt.libvirt.close()


def arriving(store: JobStore, hv: libvirt.virConnect, name: str, **spec: object) -> str:
    """A job bringing `name` (on the source, `test:///default`) to kvm2, as its source's
    preflight would have recorded it."""
    dom = hv.lookupByName(name)
    fields = {"domain": name, "src": "kvm1", "dst": "kvm2", **spec}
    job_id = store.create(MigrationSpec.model_validate(fields), host="test")
    seen = recorded(dom.UUIDString(), name=name, active=bool(dom.isActive()))
    store.update(job_id, facts=seen | ({} if dom.isActive() else {"state": "shutoff"}))
    return job_id


def verdict(store: JobStore, job_id: str) -> tuple[bool, str | None]:
    (found,) = [
        c for c in store.get(job_id).result.destination_checks if c.check == "anti_affinity"
    ]
    return found.passed, found.reason


def test_a_guest_is_refused_where_a_domain_of_its_group_runs_whatever_the_facts_say(
    env: Path, store: JobStore, hv: libvirt.virConnect, dest: Runtime
) -> None:
    hv.createXML(grouped("idle-1"), 0)  # on the source, in group web
    dest.libvirt.conn.createXML(grouped("web-b"), 0)  # running on kvm2, in group web
    # kvm2's published facts are not read here: rewritten without web-b, they change nothing.
    job_id = arriving(store, hv, "idle-1")
    with pytest.raises(PhaseFailed) as refused:
        destination_prepare(dest, store.get(job_id))
    reason = "kvm2: anti-affinity group web already there (web-b running)"
    # (The test driver cannot give its free memory: the memory check refuses too.)
    assert reason in refused.value.reason.split("; ")
    assert verdict(store, job_id) == (False, reason)
    assert store.reserved_mib("kvm2") == 0  # nothing taken: the guest stays on the source
    assert dest.ledger.incoming_job(hv.lookupByName("idle-1").UUIDString()) is None
    assert [d.name() for d in dest.libvirt.conn.listAllDomains()] == ["web-b"]


def test_a_dry_run_shows_the_refusal_and_an_offline_move_is_refused_too(
    env: Path, store: JobStore, hv: libvirt.virConnect, dest: Runtime
) -> None:
    """Declared on the guest, the rule holds for every way it can arrive: a definition moved
    offline would run next to its group the day it is started."""
    hv.createXML(grouped("idle-1"), 0)
    hv.defineXML(grouped("idle-2"))  # defined, not running
    dest.libvirt.conn.createXML(grouped("web-b"), 0)
    reason = "kvm2: anti-affinity group web already there (web-b running)"
    dry = arriving(store, hv, "idle-1", dry_run=True)
    with pytest.raises(PhaseFailed, match="anti-affinity group web already there"):
        destination_prepare(dest, store.get(dry))
    assert verdict(store, dry) == (False, reason)
    offline = arriving(store, hv, "idle-2", offline=True, live=False, persistent=True)
    with pytest.raises(PhaseFailed) as refused:
        destination_prepare(dest, store.get(offline))
    assert refused.value.reason == reason
    assert dest.libvirt.by_name("idle-2") is None


def test_only_a_running_domain_of_the_same_group_keeps_a_guest_out(
    env: Path, store: JobStore, hv: libvirt.virConnect, dest: Runtime
) -> None:
    """A defined-but-off domain of the group, or a running one of another group, is no
    neighbour (the planner counts running domains alike); once it runs, it is. (Offline
    moves: the test driver cannot give its free memory, which a live prepare checks.)"""
    hv.defineXML(grouped("idle-2"))
    here = dest.libvirt.conn
    web_b = here.defineXML(grouped("web-b"))  # defined on kvm2, not running
    here.createXML(grouped("db-a", group="db"), 0)
    offline = {"offline": True, "live": False, "persistent": True}
    first = arriving(store, hv, "idle-2", **offline)
    assert destination_prepare(dest, store.get(first)) is JobState.PREPARED
    assert verdict(store, first) == (True, None)
    store.transition(first, JobState.FAILED, host="test")
    dest.ledger.drop_incoming(hv.lookupByName("idle-2").UUIDString(), first)
    web_b.create()
    again = arriving(store, hv, "idle-2", **offline)
    with pytest.raises(PhaseFailed) as refused:
        destination_prepare(dest, store.get(again))
    assert refused.value.reason == "kvm2: anti-affinity group web already there (web-b running)"
