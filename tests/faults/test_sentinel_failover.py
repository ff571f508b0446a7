"""The Redis primary killed (kill -9) under a migration and an evacuation (issue 14).

The lab runs Redis as a Sentinel set (`drover lab up --sentinel`: a primary, a replica,
three sentinels). With dirty-1's throttled migration in transfer and an evacuation's children
under way, the primary is killed: the sentinels promote the replica, workers and the producer
reconnect to it on their own (OutageRetry over redis-py's Sentinel, kombu's sentinel
transport), and the killed node comes back as the new primary's replica. Both end in a true
final state that libvirt confirms on every host; no job is lost (every id the producer was
given still reads back, finished); no phase ran twice: each host's own worker log (a file,
not Redis, so a failover cannot take it) shows every phase of every job started once, and
the claims in Redis name exactly the phases that ran.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import load_settings
from jobs.keys import claims_key
from jobs.request_signing import forget_keys
from lab import control, sentinel_faults
from lab.state import loaded
from producer.api import Drover
from tests.faults.conftest import assert_invariants, check, finish, start_throttled
from tests.support.lab_fixtures import (
    JOB_TIMEOUT_S,
    LAB_HOSTS,
    LAB_IDLE_GUESTS,
    Lab,
    wait_for,
)

pytestmark = [pytest.mark.lab]

# Guests the evacuation brings home from lab3 while the primary dies.
EVACUATED = ("idle-1", "idle-2")


def relaunch(lab: Lab, *, sentinel: bool) -> None:
    """The session's lab again, with (or without) a Sentinel set; `lab` now points at it."""
    control.down()
    state = control.up(LAB_HOSTS, guests=LAB_IDLE_GUESTS, sentinel=sentinel)
    forget_keys()  # the new lab's signing key sits where the old one's was
    lab.status = control.status()
    lab.config = state.config
    lab.drover = Drover(load_settings(state.config))
    lab.set_paused("dirty-1", True)


@pytest.fixture(scope="module")
def sentinel_lab(lab: Lab) -> Iterator[Lab]:
    """This module's cases on a lab whose Redis is a Sentinel set; the plain lab after."""
    relaunch(lab, sentinel=True)
    try:
        yield lab
    finally:
        relaunch(lab, sentinel=False)


def phase_starts(lab: Lab) -> Counter[tuple[str, str]]:
    """(job, phase) -> how many times a worker logged starting it, over every host's log."""
    starts: Counter[tuple[str, str]] = Counter()
    _, state = loaded()
    for host in state.hosts.values():
        for line in Path(host.worker_log).read_text().splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("event") == "phase.started":
                starts[(entry["job_id"], entry["phase"])] += 1
    return starts


def test_primary_killed_under_a_migration_and_an_evacuation(sentinel_lab: Lab) -> None:
    lab, d = sentinel_lab, sentinel_lab.drover
    ids = [d.submit(domain=g, src="lab1", dst="lab3", live=True) for g in EVACUATED]
    for job_id in ids:
        setup = finish(lab, job_id)
        check(setup.state.value == "succeeded", f"setup to lab3: {setup.reason}")
    lab.set_paused("dirty-1", False)

    migration = start_throttled(lab)
    evacuation = d.evacuate(d.evacuation_spec(host="lab3", to=["lab1"], max_parallel=1))

    def child_under_way() -> bool:
        children = d.evacuation(evacuation).children.values()
        return any(d.job(c).state.value not in ("queued", "waiting") for c in children)

    wait_for(child_under_way, JOB_TIMEOUT_S, "an evacuation child under way")
    given = {migration, evacuation, *ids, *d.evacuation(evacuation).children.values()}
    # Both in flight as the primary dies.
    check(not d.job(migration).terminal, "the migration ended before the kill")
    check(not d.evacuation(evacuation).terminal, "the evacuation ended before the kill")
    killed = sentinel_faults.kill_primary()
    sentinel_faults.restart_node(killed)

    job = finish(lab, migration)
    check(job.state.value == "succeeded", f"migration {job.state.value}: {job.reason}")
    ev = d.wait_evacuation(evacuation, JOB_TIMEOUT_S)
    # After the evacuation too: its children hold memory on lab1 until they end.
    assert_invariants(lab, job)
    check(ev.state.value == "drained", f"evacuation {ev.state.value}: {ev.reason}")
    for guest in EVACUATED:
        check(lab.running_on(guest) == ["lab1"], f"{guest} runs on {lab.running_on(guest)}")
        check(not lab.view("lab3", guest).exists, f"{guest} still defined on lab3")
    children = set(ev.children.values())
    check(len(children) == len(EVACUATED), f"evacuation children {ev.children}")

    # No job lost: every id handed out reads back, finished.
    for job_id in given | children:
        if job_id == evacuation:
            continue
        child = d.job(job_id)
        check(child.state.value == "succeeded", f"{job_id}: {child.state.value} {child.reason}")
    # No phase twice: each started once per the hosts' own logs, claimed once in Redis.
    starts = phase_starts(lab)
    twice = {key: n for key, n in starts.items() if n > 1}
    check(not twice, f"phases started more than once: {twice}")
    for job_id in children | {migration}:
        ran = {phase for (j, phase) in starts if j == job_id}
        claimed = set(d.store.r.hkeys(claims_key(job_id)))
        check(bool(ran), f"{job_id}: no phase logged")
        check(claimed == ran, f"{job_id}: claims {sorted(claimed)}, ran {sorted(ran)}")
