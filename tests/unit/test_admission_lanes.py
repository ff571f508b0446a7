"""Admission by lane against a real Redis: a pass reads only what can move, a lane moves from
its head and stops at its first refusal, the cluster gate stops a pass, the safety pass finds
what the indexes lost, and a lane is never taken on trust."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from config.settings import load_settings
from jobs.admission import CLUSTER_GATE, Admission, inbound_gate, lane_of
from jobs.admission_head import BAD_SPEC, HeadTrial, Trial
from jobs.keys import LANES_READY, WAITING, job_key, lane_key
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY
from tests.unit.test_admission import settings, submit


def none(job_id: str, spec: MigrationSpec) -> None:
    """A `send` that starts nothing: these tests look at admission alone."""


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The heads every pass tries, in order."""
    heads: list[str] = []
    attempt = HeadTrial.attempt

    def spy(self: HeadTrial, lane: str, job_id: str, *args: object) -> Trial:
        heads.append(job_id)
        return attempt(self, lane, job_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(HeadTrial, "attempt", spy)
    return heads


def waiting_events(store: JobStore, job_id: str) -> int:
    return len([e for _, e in store.read_events(job_id) if e["event"] == "job.waiting"])


def test_a_lane_moves_from_its_head_stops_at_its_first_refusal_and_holds_up_no_other_lane(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, tried: list[str]
) -> None:
    cfg = settings(tmp_path, redis_srv)  # kvm2 takes one inbound migration at a time
    a, b, c = (submit(store, f"web0{i}", "kvm1", "kvm2") for i in range(3))
    d = submit(store, "db01", "kvm3", "kvm1")
    admission = Admission(store)
    spec = MigrationSpec(domain="web00", src="kvm1", dst="kvm2")
    assert admission.admit_lane(cfg, none, lane_of(spec, None)) == [a]
    assert tried == [a, b]  # c, behind the refused b, is not even read
    assert store.get(b).waiting_for == "waiting for a slot: kvm2 inbound limit 1 reached"
    assert store.get(c).waiting_for is None
    assert store.get(d).admitted is None  # another lane: not this submit's business
    assert admission.pass_(cfg, none) == [d]  # its lane was ready; kvm1 -> kvm2 is blocked
    tried.clear()
    assert admission.pass_(cfg, none) == []
    assert tried == []  # nothing can have moved: nothing read
    assert waiting_events(store, b) == 1

    store.transition(a, JobState.FAILED, host="test", reason="x")  # kvm2 inbound frees a slot
    assert admission.pass_(cfg, none) == [b]
    assert tried == [b, c]  # the lane behind the freed gate, from its head, until refused
    assert admission.waiting_ids() == [c]


def test_the_quick_pass_tries_only_lanes_blocked_on_a_gate_with_room(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, tried: list[str]
) -> None:
    cfg = settings(tmp_path, redis_srv)
    into_kvm2 = [submit(store, f"web{i}", src, "kvm2") for i, src in enumerate(["kvm1", "kvm3"])]
    out_of_kvm1 = [submit(store, f"db{i}", "kvm1", "kvm3") for i in range(3)]  # kvm1: 2 out
    admission = Admission(store)
    assert admission.pass_(cfg, none) == [into_kvm2[0], out_of_kvm1[0]]
    assert admission.gates_with_room(cfg) == []
    tried.clear()
    store.transition(out_of_kvm1[0], JobState.FAILED, host="test", reason="x")
    assert admission.gates_with_room(cfg) == ["drover:slots:out:kvm1"]
    assert admission.pass_(cfg, none) == [out_of_kvm1[1]]
    assert tried == [out_of_kvm1[1], out_of_kvm1[2]]  # kvm3 -> kvm2 (blocked on kvm2) untouched
    # The caller may name the freed gates itself.
    tried.clear()
    assert admission.admit_after_free(cfg, none, [inbound_gate("kvm2")]) == []
    assert tried == [into_kvm2[1]]


def test_a_cluster_wide_refusal_ends_the_pass(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, tried: list[str]
) -> None:
    cfg = settings(tmp_path, redis_srv, cluster=1)
    a, b, c = (
        submit(store, f"web{i}", *hosts)
        for i, hosts in enumerate([("kvm1", "kvm3"), ("kvm2", "kvm1"), ("kvm3", "kvm1")])
    )
    admission = Admission(store)
    assert admission.safety_pass(cfg, none) == [a]
    assert tried == [a, b]  # c's lane is not tried once the cluster refused b
    assert "cluster-wide limit 1 reached" in (store.get(b).waiting_for or "")
    tried.clear()
    store.transition(a, JobState.CANCELLED, host="test", reason="x")
    assert admission.pass_(cfg, none) == [b]
    assert tried == [b, c]  # oldest head first; c refused by the cluster again


def test_the_safety_pass_finds_a_lane_lost_from_every_index_and_the_old_line(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    a = submit(store, "web01", "kvm1", "kvm2")
    store.r.delete(LANES_READY)  # as if a pass died between two steps
    old = store.create(MigrationSpec(domain="web02", src="kvm3", dst="kvm1"), host="old")
    store.r.zadd(WAITING, {old: datetime.now(UTC).timestamp()})  # queued by an older drover
    admission = Admission(store)
    assert admission.pass_(cfg, none) == []
    assert admission.safety_pass(cfg, none) == [a, old]
    assert store.r.zcard(WAITING) == 0 and admission.waiting_ids() == []


def test_a_job_in_a_lane_not_its_own_ends_failed_and_takes_no_slot(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    job_id = store.create(MigrationSpec(domain="web01", src="kvm1", dst="kvm2"), host="x")
    forged = lane_key("kvm3", "kvm1")
    Admission(store).lanes.line_up(job_id, job_key(job_id), forged, 1.0)  # a Redis writer
    admission = Admission(store)
    assert admission.pass_(cfg, none) == []
    job = store.get(job_id)
    assert job.state is JobState.FAILED
    assert job.reason == (
        f"refused: the job was found in the waiting line {forged}, "
        f"not its own {lane_key('kvm1', 'kvm2')}"
    )
    assert not admission.holders(CLUSTER_GATE) and admission.waiting_ids() == []


def test_a_bad_spec_or_a_host_gone_from_the_registry_ends_the_job_and_frees_the_lane(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "two.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url))
    cfg = load_settings(path)
    gone, behind = (submit(store, f"web0{i}", "kvm1", "kvm3") for i in range(2))
    bad = submit(store, "web03", "kvm2", "kvm1")
    store.r.hset(job_key(bad), "spec", "{not json")
    admission = Admission(store)
    assert admission.pass_(cfg, none) == []
    for job_id in (gone, behind):
        job = store.get(job_id)
        assert job.state is JobState.FAILED
        assert (job.reason or "").startswith("cannot admit: unknown host 'kvm3'")
    assert store.r.hget(job_key(bad), "state") == JobState.FAILED.value
    assert store.r.hget(job_key(bad), "reason") == BAD_SPEC
    assert admission.waiting_ids() == []


def test_an_evacuations_children_wait_in_a_lane_of_their_own(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    kids = [
        submit(store, f"vm{i}", "kvm1", "kvm3", parent="0123456789ab", parent_limit=1)
        for i in range(2)
    ]
    alone = submit(store, "web01", "kvm1", "kvm3")  # same hosts, no evacuation's limit
    admission = Admission(store)
    assert admission.pass_(cfg, none) == [kids[0], alone]
    assert store.r.zrange(lane_key("kvm1", "kvm3", "0123456789ab"), 0, -1) == [kids[1]]
    store.transition(kids[0], JobState.FAILED, host="test", reason="x")
    assert admission.pass_(cfg, none) == [kids[1]]


def test_a_lane_lost_from_every_index_is_ready_again_even_when_the_cluster_is_full(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, tried: list[str]
) -> None:
    cfg = settings(tmp_path, redis_srv, cluster=1)
    first = submit(store, "web01", "kvm1", "kvm3")
    admission = Admission(store)
    assert admission.pass_(cfg, none) == [first]
    older = submit(store, "web02", "kvm2", "kvm1")
    lost = submit(store, "web03", "kvm3", "kvm2")
    store.r.delete(LANES_READY)  # neither lane is in any index now
    tried.clear()
    assert admission.safety_pass(cfg, none) == []
    assert tried == [older]  # the cluster refused it: the pass ends there
    assert store.r.zscore(LANES_READY, lane_key("kvm3", "kvm2")) is not None  # but not lost
    store.transition(first, JobState.FAILED, host="test", reason="x")
    store.transition(older, JobState.CANCELLED, host="test", reason="x")
    assert admission.pass_(cfg, none) == [lost]


def test_one_worker_of_the_fleet_does_each_safety_pass(store: JobStore) -> None:
    lanes = Admission(store).lanes
    assert lanes.claim_safety_pass("worker-a", 30)
    assert not lanes.claim_safety_pass("worker-b", 30)


def test_the_safety_pass_skips_only_lanes_truly_blocked_and_frees_slots_of_vanished_jobs(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, tried: list[str]
) -> None:
    cfg = settings(tmp_path, redis_srv)
    a = submit(store, "web01", "kvm1", "kvm2")
    b = submit(store, "web02", "kvm3", "kvm2")  # blocked on kvm2 inbound (limit 1)
    c = submit(store, "web03", "kvm1", "kvm3")
    admission = Admission(store)
    assert admission.pass_(cfg, none) == [a, c]
    tried.clear()
    assert admission.safety_pass(cfg, none) == []
    assert tried == []  # b's lane waits on a gate of its own that is full: nothing to try

    d = submit(store, "web04", "kvm3", "kvm1")
    store.r.delete(LANES_READY)
    forged = lane_key("kvm3", "kvm1")  # a Redis writer says it waits on kvm2's inbound gate
    store.r.hset("drover:lanes:blocked_by", forged, inbound_gate("kvm2"))
    store.r.zadd(f"drover:lanes:blocked:{inbound_gate('kvm2')}", {forged: 0})
    assert admission.pass_(cfg, none) == []  # the quick pass believes the index
    assert admission.safety_pass(cfg, none) == [d]  # the safety pass checks it: not d's gate

    store.r.delete(job_key(a))  # a crash left kvm2's slot held by a job that is gone
    assert admission.pass_(cfg, none) == []
    assert admission.safety_pass(cfg, none) == [b]


WIDE = """
redis_url = "{url}"
[cluster]
max_migrations = {cluster}
[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"
limits = {{ max_outbound = 10, max_inbound = 10 }}
[hosts.kvm2]
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
limits = {{ max_outbound = 10, max_inbound = 10 }}
"""


def test_a_pass_reads_lanes_a_page_at_a_time_oldest_head_first(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobs.lanes.LANE_PAGE", 2)
    path = tmp_path / "wide.toml"

    def registry(cluster: int):  # type: ignore[no-untyped-def]
        path.write_text(WIDE.format(url=redis_srv.url, cluster=cluster))
        return load_settings(path)

    jobs = [  # one lane each: every evacuation has its own
        submit(store, f"vm{i}", "kvm1", "kvm2", parent=f"00000000000{i}", parent_limit=5)
        for i in range(7)
    ]
    admission = Admission(store)
    assert admission.pass_(registry(1), none) == jobs[:1]  # jobs[1] refused: the pass ends
    assert admission.pass_(registry(8), none) == jobs[1:]  # blocked and ready lanes, merged
