"""`drover jobs` with its filters, through the CLI as a user runs it, on a real Redis; and
the optional quota of waiting jobs per producer."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest

from config.settings import load_settings
from jobs.evacuation import EvacuationSpec, EvacuationState, EvacuationStore
from jobs.keys import JOBS_INDEX, job_key, jobs_by_host_key
from jobs.quota import QuotaFull
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from tests.conftest import RedisServer
from tests.support.cli import run_drover
from tests.support.registry import hosts_toml

HOUR_S = 3600
REGISTRY = 'redis_url = "{url}"\n{extra}\n' + hosts_toml(3)


def fleet(tmp_path: Path, redis_srv: RedisServer, extra: str = "") -> Path:
    path = tmp_path / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url, extra=extra))
    return path


def submit(store: JobStore, domain: str, src: str, dst: str, end: JobState | None) -> str:
    job_id = enqueue(store, MigrationSpec(domain=domain, src=src, dst=dst), origin="t")
    if end is not None:
        assert store.transition(job_id, end, host="t", reason="test")[0]
    return job_id


def age(store: JobStore, job_id: str, hours: float, hosts: tuple[str, ...]) -> None:
    """As if the record had been created `hours` ago (every index scores creation time)."""
    score = float(store.r.zscore(JOBS_INDEX, job_id) or 0) - hours * HOUR_S  # type: ignore[arg-type]
    for key in (JOBS_INDEX, *(jobs_by_host_key(h) for h in hosts)):
        store.r.zadd(key, {job_id: score})
    for state in ("succeeded", "failed", "cancelled"):
        key = f"drover:jobs:state:{state}"
        if store.r.zscore(key, job_id) is not None:
            store.r.zadd(key, {job_id: score})


def domains(store: JobStore) -> set[str | None]:
    """The domain of every record in the index."""
    found = set()
    for job_id in store.r.zrange(JOBS_INDEX, 0, -1):  # type: ignore[union-attr]
        raw = store.r.hget(job_key(job_id), "spec")
        found.add(json.loads(raw).get("domain"))  # type: ignore[arg-type]
    return found


def listed(config: Path, *args: str) -> list[str]:
    done = run_drover(config, "jobs", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return [row["id"] for row in rows]


@pytest.fixture
def history(tmp_path: Path, redis_srv: RedisServer) -> tuple[Path, dict[str, str]]:
    """Newest last: an old success, a failure, a cancelled job, a queued one, an evacuation."""
    config = fleet(tmp_path, redis_srv)
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    ids = {
        "old": submit(store, "a", "kvm1", "kvm2", None),
        "failed": submit(store, "b", "kvm2", "kvm3", JobState.FAILED),
        "cancelled": submit(store, "c", "kvm3", "kvm1", JobState.CANCELLED),
        "queued": submit(store, "d", "kvm1", "kvm3", None),
    }
    for step in (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING, JobState.FINISHING):
        store.transition(ids["old"], step, host="t")
    assert store.transition(ids["old"], JobState.SUCCEEDED, host="t")[0]
    age(store, ids["old"], 3, ("kvm1", "kvm2"))
    evacuations = EvacuationStore(store)
    ids["evacuation"] = evacuations.create(EvacuationSpec(host="kvm2"), "t")
    evacuations.transition(ids["evacuation"], EvacuationState.PLANNING)
    return config, ids


def test_jobs_lists_newest_first_and_filters_by_state_host_and_since(
    history: tuple[Path, dict[str, str]],
) -> None:
    config, ids = history
    everything = listed(config)
    assert everything == [ids[k] for k in ("evacuation", "queued", "cancelled", "failed", "old")]
    assert listed(config, "--limit", "2") == [ids["evacuation"], ids["queued"]]
    assert listed(config, "--state", "failed") == [ids["failed"]]
    assert listed(config, "--state", "succeeded,cancelled") == [ids["cancelled"], ids["old"]]
    assert listed(config, "--state", "queued", "--state", "planning") == [
        ids["evacuation"],
        ids["queued"],
    ]
    assert listed(config, "--host", "kvm2") == [ids["evacuation"], ids["failed"], ids["old"]]
    assert listed(config, "--host", "kvm1", "--state", "cancelled,queued") == [
        ids["queued"],
        ids["cancelled"],
    ]
    assert listed(config, "--since", "2h") == everything[:-1]
    assert listed(config, "--since", "4h") == everything
    assert listed(config, "--since", "2h", "--state", "succeeded") == []
    assert listed(config, "--since", "2000-01-01T00:00") == everything


def test_jobs_table_shows_the_filtered_records(history: tuple[Path, dict[str, str]]) -> None:
    config, ids = history
    done = run_drover(config, "jobs", "--state", "failed")
    assert done.returncode == 0, done.stderr
    assert ids["failed"] in done.stdout
    assert ids["queued"] not in done.stdout


def test_a_record_written_by_hand_is_left_out_and_said_never_hiding_the_rest(
    history: tuple[Path, dict[str, str]], redis_srv: RedisServer
) -> None:
    """One record drover cannot read (anyone with the Redis password can write one) used to
    make `drover jobs` fail as a whole: it is left out, with one line saying which and why."""
    config, ids = history
    store = JobStore.from_url(redis_srv.url)
    store.r.hset(f"drover:job:{ids['failed']}", "spec", "not json")
    for args in (["--json"], []):
        done = run_drover(config, "jobs", *args)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert ids["failed"] in done.stderr and "left out of this list" in done.stderr
        assert ids["queued"] in done.stdout and ids["failed"] not in done.stdout
    assert listed(config) == [i for k, i in reversed(ids.items()) if k != "failed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state", "exploded"], "unknown state 'exploded' (states: "),
        (["--state", "failed,nope"], "unknown state 'nope'"),
        (["--state", ""], "--state names an empty state (states: "),
        (["--state", ","], "--state names an empty state (states: "),
        (["--state", "failed,"], "--state names an empty state (states: "),
        (["--state", "failed", "--state", " "], "--state names an empty state (states: "),
        (["--host", "kvm9"], "unknown host 'kvm9' (known hosts: kvm1, kvm2, kvm3)"),
        (["--since", "yesterday"], "--since 'yesterday' is neither a duration"),
        (["--since", "5x"], "--since '5x' is neither a duration"),
        (["--since", "2999-01-01T00:00"], "--since '2999-01-01T00:00' is in the future"),
        (["--limit", "0"], "Invalid value for '--limit'"),
    ],
)
def test_jobs_refuses_a_bad_filter_in_one_line(
    tmp_path: Path, redis_srv: RedisServer, args: list[str], message: str
) -> None:
    done = run_drover(fleet(tmp_path, redis_srv), "jobs", *args)
    assert done.returncode == 2
    assert message in done.stderr
    if not message.startswith("Invalid value"):  # Click's own usage box
        assert done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr


def test_a_producer_past_its_quota_of_waiting_jobs_is_refused_and_nothing_is_kept(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    extra = "[cluster]\nmax_migrations = 1\nmax_waiting_per_producer = 2\n"
    config = fleet(tmp_path, redis_srv, extra)
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()

    def migrate(domain: str) -> subprocess.CompletedProcess[str]:
        return run_drover(config, "migrate", domain, "--from", "kvm1", "--to", "kvm2")

    # The first is admitted at once (the cluster has one slot); two more wait: the quota.
    started = [migrate(f"web{n}") for n in range(3)]
    assert [d.returncode for d in started] == [0, 0, 0], [d.stderr for d in started]
    keys = set(cast(list[str], store.r.keys("drover:*")))

    refused = migrate("web9")

    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "already has 2 jobs waiting for a slot ([cluster] max_waiting_per_producer)" in (
        refused.stderr
    )
    assert set(cast(list[str], store.r.keys("drover:*"))) == keys
    assert "web9" not in domains(store)
    # Once one has ended, the slot goes to a waiting job, and the producer may submit again.
    first = started[0].stdout.strip()
    assert store.transition(first, JobState.CANCELLED, host="t")[0]
    settings = load_settings(config)
    from jobs.admission import Admission

    Admission(store).safety_pass(settings, lambda job_id, spec: None)
    again = migrate("web9")
    assert again.returncode == 0, again.stderr


def test_an_evacuations_children_are_not_counted(redis_srv: RedisServer) -> None:
    store = JobStore.from_url(redis_srv.url)
    store.r.flushdb()
    spec = MigrationSpec(domain="web1", src="kvm1", dst="kvm2")
    enqueue(store, spec, origin="p", max_waiting=1)
    with pytest.raises(QuotaFull):
        enqueue(store, spec.model_copy(update={"domain": "web2"}), origin="p", max_waiting=1)
    ev = EvacuationStore(store).create(EvacuationSpec(host="kvm1"), "p")
    child = spec.model_copy(update={"domain": "web3"})
    assert enqueue(store, child, origin="p", parent=ev, parent_limit=2)  # no quota for children
    assert domains(store) == {"web1", "web3", None}  # None: the evacuation


def test_a_forged_time_shows_no_duration_rather_than_a_negative_one(
    history: tuple[Path, dict[str, str]], redis_srv: RedisServer
) -> None:
    """Probe: an ended record whose `updated` was written before its creation (anyone with the
    Redis password can) showed a negative duration in `drover jobs`."""
    config, ids = history
    store = JobStore.from_url(redis_srv.url)
    store.r.hset(job_key(ids["failed"]), "updated", "2000-01-01T00:00:00+00:00")
    store.r.hset(job_key(ids["cancelled"]), "updated", "9999-12-31T00:00:00+00:00")  # ahead
    done = run_drover(config, "jobs", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in json.loads(done.stdout)}
    assert rows[ids["failed"]]["duration_s"] is None
    assert rows[ids["cancelled"]]["duration_s"] is None
    assert rows[ids["old"]]["duration_s"] >= 0  # the others as they were
    table = run_drover(config, "jobs", "--state", "failed")
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if ids["failed"] in line]
    assert " ? " in row and not re.search(r"-\d", row), row
