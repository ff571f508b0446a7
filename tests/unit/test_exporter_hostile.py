"""One hostile write into Redis costs the fleet exporter only the figures read from that key.

Anyone with the producer's Redis password can write any `drover:*` key: a string where a set
should be, a member of `drover:lanes` naming another key, a record drover cannot parse. Before,
one such write (`SADD drover:lanes drover:hosts:disabled`, found by a probe) made every scrape
say `drover_exporter_redis_up 0` with no figure at all, or fail with HTTP 500 (bytes that are
not UTF-8, JSON nested too deep), or count what was not there (a lane naming `drover:jobs`).
Now Redis still "answered" (`drover_exporter_redis_up 1`), every other series is as it was,
the figures read from the bad key are left out (never shown as 0) and
`drover_exporter_read_errors_total{part}` counts the scrape for that part.

The fleet of tests/unit/test_fleet_exporter.py on the real test Redis; the exporter built as
`drover exporter` builds it (its client, its lease), scraped in-process as its HTTP handler
does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from jobs.evacuation_model import EVACUATION_TERMINAL, EvacuationState
from jobs.keys import (
    ACTIVE_EVACUATIONS,
    ACTIVE_JOBS,
    CLUSTER_GATE,
    DISABLED_HOSTS,
    EVACUATIONS_INDEX,
    JOBS_INDEX,
    LANE_PREFIX,
    LANES,
    LANES_BLOCKED_BY,
    SCHEDULE_INDEX,
    WAITING,
    children_key,
    job_key,
    jobs_by_state_key,
)
from jobs.states import LIVE
from producer.exporter import Exporter
from producer.exporter_collector import PARTS
from tests.conftest import RedisServer
from tests.unit.test_fleet_exporter import Samples, build_fleet, write_config

Key = tuple[str, tuple[tuple[str, str], ...]]
ERRORS = "drover_exporter_read_errors_total"
Write = Callable[[redis.Redis, dict[str, str]], object]  # a hostile write, given the fleet's ids


def series(name: str, **labels: str) -> Key:
    return (f"drover_{name}", tuple(sorted(labels.items())))


@dataclass(frozen=True)
class Hostile:
    """A write, the parts whose figures it spoils, and what the scrape shows of them."""

    write: Write
    parts: set[str]
    gone: set[str] = field(default_factory=set)  # families left out whole
    changed: Callable[[dict[str, str]], dict[Key, float | None]] = field(
        default=lambda ids: {}
    )  # series now absent (None) or of another value


def retype(key: str) -> Write:
    """The key replaced by a string: every read of it as a set, hash or sorted set fails."""
    return lambda r, ids: (r.delete(key), r.set(key, "x"))


def hset(key: Callable[[dict[str, str]], str], name: bytes | str, value: bytes | str) -> Write:
    """Write one field of a hash, bytes as they are (HSET of redis-py is typed for str)."""
    return lambda r, ids: r.execute_command("HSET", key(ids), name, value)  # type: ignore[no-untyped-call]


def absent(*keys: Key) -> Callable[[dict[str, str]], dict[Key, float | None]]:
    return lambda ids: dict.fromkeys(keys)


LIVE_JOB_STATES = [s.value for s in LIVE]
SHARED = (*(series("jobs", state=s) for s in ("failed", "cancelled")),)
SHARED_EVACUATIONS = (*(series("evacuations", state=s) for s in ("failed", "cancelled")),)
LIVE_EVACUATION_STATES = [s.value for s in EvacuationState if s not in EVACUATION_TERMINAL]

CASES: dict[str, Hostile] = {
    # The probe's write: a member of the lanes naming a hash.
    "lane member is a hash": Hostile(lambda r, ids: r.sadd(LANES, DISABLED_HOSTS), {"waiting"}),
    # A member naming a sorted set that is no lane: its size was counted as waiting jobs.
    "lane member is the job index": Hostile(lambda r, ids: r.sadd(LANES, JOBS_INDEX), {"waiting"}),
    "lane key holds a string": Hostile(
        lambda r, ids: (
            r.set(f"{LANE_PREFIX}kvm9:kvm8", "x"),
            r.sadd(LANES, f"{LANE_PREFIX}kvm9:kvm8"),
        ),
        {"waiting"},
    ),
    "lanes not a set": Hostile(retype(LANES), {"waiting"}, {"drover_jobs_waiting"}),
    "blocked-by not a hash": Hostile(
        retype(LANES_BLOCKED_BY), {"waiting"}, {"drover_jobs_waiting"}
    ),
    "old waiting line not a sorted set": Hostile(
        retype(WAITING), {"waiting"}, {"drover_jobs_waiting"}
    ),
    "active jobs not a set": Hostile(
        retype(ACTIVE_JOBS), {"jobs"}, changed=absent(series("jobs", state="queued"))
    ),
    "cluster gate not a set": Hostile(
        retype(CLUSTER_GATE),
        {"jobs"},
        changed=lambda ids: {series("jobs", state=s): None for s in LIVE_JOB_STATES},
    ),
    "slot holder's record not a hash": Hostile(
        lambda r, ids: (r.sadd(CLUSTER_GATE, "bogus"), r.set(job_key("bogus"), "x")), {"jobs"}
    ),
    # Bytes that are not UTF-8 in a slot holder's state: the whole MULTI reply failed to decode.
    "slot holder's state not UTF-8": Hostile(
        hset(lambda ids: job_key(ids["migrating"]), "state", b"\xff\xfe"),
        {"jobs"},
        changed=lambda ids: {
            series("jobs", state="migrating"): 0,
            series("jobs", state="queued"): 5,
        },
    ),
    "a final state's index not a sorted set": Hostile(
        retype(jobs_by_state_key("failed")),
        {"jobs", "evacuations"},
        changed=absent(series("jobs", state="failed"), series("evacuations", state="failed")),
    ),
    "evacuation index not a sorted set": Hostile(
        retype(EVACUATIONS_INDEX),
        {"jobs", "evacuations"},
        changed=absent(*SHARED, *SHARED_EVACUATIONS),
    ),
    "active evacuations not a set": Hostile(
        retype(ACTIVE_EVACUATIONS),
        {"evacuations", "guests_left"},
        {"drover_evacuation_guests_left"},
        absent(*(series("evacuations", state=s) for s in LIVE_EVACUATION_STATES)),
    ),
    "active evacuation's record not a hash": Hostile(
        lambda r, ids: (r.sadd(ACTIVE_EVACUATIONS, "bogus"), r.set(job_key("bogus"), "x")),
        {"evacuations"},
    ),
    "active evacuation id not UTF-8": Hostile(
        lambda r, ids: r.sadd(ACTIVE_EVACUATIONS, b"\xff"), set()
    ),
    "evacuation's children not a hash": Hostile(
        lambda r, ids: retype(children_key(ids["evacuation"]))(r, ids),
        {"guests_left"},
        changed=lambda ids: {
            series("evacuation_guests_left", evacuation=ids["evacuation"], host="kvm3"): None
        },
    ),
    "evacuation child's record not a hash": Hostile(
        lambda r, ids: retype(job_key(ids["child"]))(r, ids),
        {"guests_left"},
        changed=lambda ids: {
            series("evacuation_guests_left", evacuation=ids["evacuation"], host="kvm3"): 2
        },
    ),
    # Its plan unreadable: a row saying 0 guests left, or (nested too deep) HTTP 500.
    **{
        f"evacuation's plan {name}": Hostile(
            hset(lambda ids: job_key(ids["evacuation"]), "plan", plan),
            {"guests_left"},
            changed=lambda ids: {
                series("evacuation_guests_left", evacuation=ids["evacuation"], host="kvm3"): None
            },
        )
        for name, plan in (("not JSON", "{bad"), ("nested too deep", "[" * 100_000))
    },
    "hosts in maintenance not a hash": Hostile(
        retype(DISABLED_HOSTS),
        {"maintenance"},
        {"drover_hosts_in_maintenance", "drover_host_maintenance_since_timestamp_seconds"},
    ),
    "host in maintenance not UTF-8": Hostile(
        hset(lambda ids: DISABLED_HOSTS, b"\xff", "{}"),
        set(),
        changed=lambda ids: {series("hosts_in_maintenance"): 2},
    ),
    "schedule index not a sorted set": Hostile(
        retype(SCHEDULE_INDEX),
        {"schedules"},
        {"drover_schedules", "drover_schedule_next_fire_timestamp_seconds"},
    ),
}


@pytest.fixture
def exporter(
    tmp_path: Path, redis_srv: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Exporter]:
    redis.Redis.from_url(redis_srv.url).flushdb()
    config = write_config(tmp_path / "drover.toml", redis_srv.url)
    monkeypatch.setenv("DROVER_CONFIG", str(config))
    e = Exporter(load_settings(config), say=lambda line: None)
    yield e
    e.lease.release()
    e.client.close()


def scrape(e: Exporter) -> Samples:
    """One scrape as the exporter's HTTP handler makes it (an exception there: HTTP 500)."""
    e.tick()  # takes the lease: the active exporter
    text = generate_latest(e.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_hostile_write_costs_only_the_figures_read_from_its_key(
    exporter: Exporter, redis_srv: RedisServer, tmp_path: Path, case: str
) -> None:
    hostile = CASES[case]
    ids = build_fleet(tmp_path / "drover.toml")
    before = scrape(exporter)
    assert before[series("exporter_redis_up")] == 1
    assert all(before[(ERRORS, (("part", part),))] == 0 for part in PARTS)
    r = redis.Redis.from_url(redis_srv.url)

    hostile.write(r, ids)
    got = scrape(exporter)  # before: redis_up 0 and nothing else, HTTP 500, or a wrong count

    assert got[series("exporter_redis_up")] == 1  # Redis answered
    expected: dict[Key, float | None] = {
        key: value
        for key, value in before.items()
        if key[0] not in hostile.gone and key[0] != ERRORS
    }
    expected |= hostile.changed(ids)
    shown = {key: value for key, value in got.items() if key[0] != ERRORS}
    assert shown == {key: value for key, value in expected.items() if value is not None}
    for part in PARTS:
        assert got[(ERRORS, (("part", part),))] == (1 if part in hostile.parts else 0), part
