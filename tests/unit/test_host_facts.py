"""Host facts as the planner reads them from the real test Redis: a record is a claim, judged
per host (missing, expired, future-dated, malformed, oversized, another host's, a worker
that cannot read libvirtd), never a crash; and the report duty publishes one."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jobs.host_facts import (
    MAX_DOMAINS,
    MAX_FACTS_BYTES,
    HostCpu,
    HostFacts,
    RunningDomain,
    publish_facts,
    read_facts,
)
from jobs.keys import host_facts_key
from jobs.reservation_read import reserved_by_host
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from tests.unit import test_libvirt_seam as seam
from worker.keeper import _report

env = seam.env  # the seam tests' fixtures: a registry file, the test hypervisor
hv = seam.hv

MAX_AGE_S, SKEW_S = 15.0, 5.0
CPU = HostCpu(virt_type="kvm", arch="x86_64", vendor="Intel", model="Skylake-Client")


def record(host: str = "kvm2", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host": host,
        "worker": "w1",
        "ts": datetime.now(UTC).isoformat(),
        "free_mib": 4096,
        "active_mib": 1024,
        "cpus": [CPU.model_dump(mode="json")],
        "domains": [{"name": "web-1", "memory_mib": 1024, "group": "web"}],
    }
    return base | fields


def judged(store: JobStore, raw: str | None, host: str = "kvm2") -> HostFacts | str:
    if raw is not None:
        store.r.set(host_facts_key(host), raw, px=30_000)
    return read_facts(store.r, [host], MAX_AGE_S, SKEW_S)[host]


def test_a_published_record_is_read_back_whole(store: JobStore) -> None:
    facts = HostFacts.model_validate(record())
    publish_facts(store.r, facts, MAX_AGE_S)
    assert read_facts(store.r, ["kvm2"], MAX_AGE_S, SKEW_S) == {"kvm2": facts}
    ttl_ms = store.r.pttl(host_facts_key("kvm2"))
    assert 0 < ttl_ms <= MAX_AGE_S * 1000  # it goes away on its own once its worker stops
    assert facts.cpu("kvm") == CPU and facts.cpu("qemu") is None


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"free_mib": -1}, "free_mib"),
        ({"free_mib": "[bold]9[/bold]"}, "free_mib"),
        ({"ts": "2026-12-01T10:00:00"}, "ts"),  # no time zone: when was that?
        ({"host": ""}, "host"),
        ({"evil": 1}, "evil"),
        ({"domains": [{"name": "x", "memory_mib": 1, "group": "g" * 5000}]}, "domains.0.group"),
        ({"domains": [{"name": "x", "memory_mib": 1}] * (MAX_DOMAINS + 1)}, "domains"),
        ({"cpus": [CPU.model_dump(mode="json") | {"model": "a b;rm -rf"}]}, "cpus.0.model"),
        (
            {"cpus": [CPU.model_dump(mode="json") | {"features": [f"x{i}" for i in range(2000)]}]},
            "cpus.0.features",
        ),
        ({"cpus": [CPU.model_dump(mode="json")] * 5}, "cpus"),
    ],
)
def test_hostile_or_malformed_records_are_refused_with_where(
    store: JobStore, fields: dict[str, Any], where: str
) -> None:
    with pytest.raises(ValidationError):
        HostFacts.model_validate(record(**fields))
    why = judged(store, json.dumps(record(**fields)))
    assert isinstance(why, str)
    assert why.startswith(f"no recent facts from its worker (invalid record: {where}"), why


def test_each_unusable_record_says_why_in_one_line(store: JobStore) -> None:
    old = (datetime.now(UTC) - timedelta(seconds=60)).isoformat()
    ahead = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    cases = {
        None: "no recent facts from its worker (none published, or expired)",
        "not json": "no recent facts from its worker (invalid record: record: Invalid JSON",
        json.dumps(record(ts=old)): "no recent facts from its worker (last published 60 s ago)",
        json.dumps(record(ts=ahead)): "no recent facts from its worker (its record is dated 60",
        json.dumps(record(host="kvm3")): "no recent facts from its worker (the record names",
        "x" * (MAX_FACTS_BYTES + 1): "no recent facts from its worker (its record is over",
        json.dumps(record(error="cannot connect to libvirt")): (
            "its worker cannot read libvirtd: cannot connect to libvirt"
        ),
    }
    for raw, reason in cases.items():
        store.r.delete(host_facts_key("kvm2"))
        why = judged(store, raw)
        assert isinstance(why, str) and why.startswith(reason), (raw and raw[:40], why)
        assert "\n" not in why


def test_reservations_for_the_whole_fleet_in_one_read(store: JobStore) -> None:
    job_id = store.create(MigrationSpec(domain="a", src="kvm1", dst="kvm2"), host="test")
    store.transition(job_id, JobState.PREFLIGHT, host="test")
    assert store.reserve("kvm2", job_id, 512)
    assert reserved_by_host(store.r, ["kvm1", "kvm2"]) == {"kvm1": 0, "kvm2": 512}


def test_the_report_duty_publishes_facts_saying_libvirt_could_not_be_read(
    env: Path, store: JobStore, hv: object, tmp_path: Path
) -> None:
    # libvirt's test driver has no memory statistics: the record says so, and the planner
    # takes that as the host's reason (the host report for `drover hosts` too).
    rt = seam.runtime(store, "kvm2", tmp_path)
    _report(rt)
    why = read_facts(store.r, ["kvm2"], MAX_AGE_S, SKEW_S)["kvm2"]
    assert isinstance(why, str) and why.startswith("its worker cannot read libvirtd: "), why
    assert "not supported" in why
    assert store.host_report("kvm2")["error"]


def test_running_domains_are_typed_and_bounded() -> None:
    RunningDomain(name="a" * 1024, memory_mib=1, group=None)
    with pytest.raises(ValidationError):
        RunningDomain(name="a", memory_mib=-5)
