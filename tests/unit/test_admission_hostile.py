"""Admission against hostile values in Redis (a Redis password's worth of writes): a refused
head leaves its lane even when nothing can be written to its stream, one lane's error stops
no other lane, and a producer starting its own job gets past such a head too."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from structlog.testing import capture_logs

from config.settings import load_settings
from jobs.admission import Admission, outbound_gate
from jobs.keys import events_key, inbound_gate, job_key, lane_key
from jobs.lanes import Lanes
from jobs.request_signing import signer_for, verifier_for
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from producer.api import Drover
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY, make_fleet_keys, signing_section
from tests.unit.test_admission import settings, submit

FORGED = "000lane"


def none(job_id: str, spec: MigrationSpec) -> None:
    """A `send` that starts nothing: these tests look at admission alone."""


def forge_head(r: redis.Redis, src: str, dst: str, **fields: str) -> None:
    """What the probe wrote: a queued job at the head of src -> dst with no signed request,
    and, where its event stream goes, a hash."""
    spec = MigrationSpec(domain="forged", src=src, dst=dst).model_dump_json()
    r.hset(job_key(FORGED), mapping={"id": FORGED, "spec": spec, "state": "queued", **fields})
    r.hset(events_key(FORGED), "x", "y")
    Lanes(r).line_up(FORGED, job_key(FORGED), lane_key(src, dst, None), 1.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fleet_keys(tmp_path_factory.mktemp("keys"))


def unreadable(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["key"] for e in logs if e["event"] == "record.unreadable"]


def test_an_unsigned_head_whose_stream_is_no_stream_is_failed_and_the_lane_moves(
    tmp_path: Path, redis_srv: RedisServer, keys: Path
) -> None:
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(keys))
    cfg = load_settings(config)
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    forge_head(store.r, "kvm1", "kvm2")
    good = submit(store, "web01", "kvm1", "kvm2", signer=signer_for(cfg.security))
    started: list[str] = []
    admission = Admission(store, verifier_for(cfg.security))
    with capture_logs() as logs:
        assert admission.pass_(cfg, lambda job_id, _: started.append(job_id)) == [good]
    assert started == [good]
    state, reason = cast(list[str | None], store.r.hmget(job_key(FORGED), ["state", "reason"]))
    assert state == JobState.FAILED.value
    assert reason is not None and reason.startswith("security: ")
    assert admission.waiting_ids() == []
    assert unreadable(logs) == [events_key(FORGED), events_key(FORGED)]  # both its events
    assert store.r.type(events_key(FORGED)) == "hash"  # left as it was found


def test_a_head_whose_record_cannot_take_the_state_still_leaves_its_lane(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    forge_head(store.r, "kvm1", "kvm2", parent_limit="many")  # refused whatever the signing
    store.r.set(f"{job_key(FORGED)}:transitions", "not a list")
    good = submit(store, "web01", "kvm1", "kvm2")
    assert Admission(store).pass_(cfg, none) == [good]
    # Its history that is no list is passed over: the refused head still ends (0dc1a89).
    assert store.r.hget(job_key(FORGED), "state") == JobState.FAILED.value


def test_a_head_that_is_no_hash_leaves_its_lane(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    store.r.set(job_key(FORGED), "not a job")
    store.r.zadd(lane_key("kvm1", "kvm2", None), {FORGED: 1.0})  # line_up would HSET it
    good = submit(store, "web01", "kvm1", "kvm2")
    with capture_logs() as logs:
        assert Admission(store).pass_(cfg, none) == [good]
    assert unreadable(logs) == [job_key(FORGED)]


def test_an_error_in_one_lane_is_logged_once_and_the_others_still_admit(
    store: JobStore, redis_srv: RedisServer, tmp_path: Path
) -> None:
    cfg = settings(tmp_path, redis_srv)
    stuck = submit(store, "db01", "kvm3", "kvm1")  # the oldest: tried first
    store.r.set(outbound_gate("kvm3"), "not a set")  # every admission of its lane fails
    good = submit(store, "web01", "kvm1", "kvm2")
    admission = Admission(store)
    with capture_logs() as logs:
        assert admission.pass_(cfg, none) == [good]
        assert admission.safety_pass(cfg, none) == []
    failed = [e for e in logs if e["event"] == "admission.lane_failed"]
    assert [e["lane"] for e in failed] == [lane_key("kvm3", "kvm1", None)]  # once, not per pass
    assert "WRONGTYPE" in failed[0]["error"]
    assert admission.waiting_ids() == [stuck]
    store.r.delete(outbound_gate("kvm3"))  # the key gone: the lane moves again
    assert admission.safety_pass(cfg, none) == [stuck]


def test_a_producer_starts_its_job_behind_a_refused_head_whose_stream_is_no_stream(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    cfg = settings(tmp_path, redis_srv)
    r = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    r.flushdb()
    forge_head(r, "kvm1", "kvm2", parent_limit="many")
    notices: list[str] = []
    drover = Drover(cfg, notice=notices.append)
    sent: list[object] = []
    drover.send = sent.append  # type: ignore[method-assign,assignment]
    with capture_logs():
        job_id = drover.submit(domain="web01", src="kvm1", dst="kvm2")
    assert notices == []
    assert len(sent) == 1
    assert drover.store.get(job_id).admitted is not None
    assert r.hget(job_key(FORGED), "state") == JobState.FAILED.value
    assert drover.admission.waiting_ids() == []


def test_slots_held_by_records_no_key_signed_are_taken_back_and_real_holders_kept(
    tmp_path: Path, redis_srv: RedisServer, keys: Path
) -> None:
    """Probe: `SADD drover:slots:in:lab3 fakeA fakeB` beside records written `migrating`
    filled lab3's inbound gate with jobs that do not exist, and every real job toward lab3
    waited for as long as they stayed. With signing on, the next safety pass takes back a
    slot whose holder's record carries no signed request; a real holder keeps its own."""
    config = tmp_path / "drover.toml"
    config.write_text(REGISTRY.format(url=redis_srv.url) + signing_section(keys))
    cfg = load_settings(config)
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    for fake in ("fakeA", "fakeB"):  # kvm2 takes two at a time (the default): full
        store.r.hset(job_key(fake), mapping={"id": fake, "state": "migrating"})
        store.r.sadd(inbound_gate("kvm2"), fake)
    signer, started = signer_for(cfg.security), []
    a = submit(store, "web01", "kvm1", "kvm2", signer=signer)
    b = submit(store, "web02", "kvm1", "kvm2", signer=signer)
    admission = Admission(store, verifier_for(cfg.security))
    assert admission.pass_(cfg, lambda j, _: started.append(j)) == []  # held by the fakes
    with capture_logs() as logs:
        for _ in range(2):  # a pass may leave a lane for the next one
            admission.safety_pass(cfg, lambda j, _: started.append(j))
    assert sorted(started) == sorted([a, b]) and admission.holders(inbound_gate("kvm2")) == {a, b}
    said = sorted(e["reason"] for e in logs if e["event"] == "security.rejected")
    assert len(said) == 2 and "held by fakeA" in said[0] and "held by fakeB" in said[1]
    c = submit(store, "web03", "kvm1", "kvm2", signer=signer)
    assert admission.safety_pass(cfg, lambda j, _: started.append(j)) == []
    assert admission.holders(inbound_gate("kvm2")) == {a, b}  # real holders keep their slots
    assert c not in started and store.get(c).state is JobState.QUEUED
