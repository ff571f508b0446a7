"""`drover exporter`: the fleet's series as Prometheus reads them, from real `drover exporter`
processes on a real Redis, the fleet built through drover's own store and submission code.

Scrapes go over HTTP and are parsed with prometheus_client's own parser: what a Prometheus
server would ingest. Two exporters: one serves the fleet; kill it and the other takes over.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from config.redis_acl import PRODUCER
from config.redis_acl_model import BrokerNames
from config.settings import load_settings
from jobs.admission import Admission
from jobs.evacuation import EvacuationSpec, EvacuationState, EvacuationStore, Placement
from jobs.keys import EVACUATIONS_INDEX, EXPORTER_LEASE, SCHEDULE_INDEX
from jobs.lease import Lease
from jobs.maintenance import Maintenance
from jobs.spec import MigrationSpec
from jobs.states import JobState
from jobs.store import JobStore
from jobs.submission import enqueue
from lab.proc import wait_until
from schedules.records import EvacuationRequest
from schedules.store import ScheduleStore
from tests.conftest import RedisServer, free_port
from tests.support.cli import run_drover
from tests.support.process import terminate
from tests.support.registry import hosts_toml, with_state_dirs
from tests.unit.test_redis_acl import AclRedis

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT_S = 15.0  # far above the exporter's own bound on Redis: a hang fails the test
START_TIMEOUT_S = 30.0
TAKEOVER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# A short lease, so a standby takes over quickly; the outage test holds it longer.
FAST_LEASE = "exporter_lease_ttl = 2.0\nexporter_lease_renew = 0.3\nexporter_redis_timeout = 1.0\n"
LONG_LEASE = (
    "exporter_lease_ttl = 120.0\nexporter_lease_renew = 0.3\nexporter_redis_timeout = 1.0\n"
)
REGISTRY = """redis_url = "{url}"

[cluster]
max_migrations = 4

[tunables]
{tunables}
{hosts}
[hosts.kvm1.limits]
max_outbound = 1
"""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_config(path: Path, url: str, tunables: str = FAST_LEASE, hosts: int = 3) -> Path:
    text = REGISTRY.format(url=url, tunables=tunables, hosts=hosts_toml(hosts))
    path.write_text(with_state_dirs(text, path.parent / "state"))
    return path


@dataclass
class ExporterProcess:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def scrape(self) -> Samples:
        """Every sample of one scrape: (name, sorted labels) -> value."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            self.scrape()
        except OSError:
            return False
        return True

    def active(self) -> bool:
        return self.scrape().get(("drover_exporter_active", ())) == 1.0

    def stop(self) -> int:
        return terminate(self.proc, STOP_TIMEOUT_S)


@pytest.fixture
def exporters(tmp_path: Path) -> Iterator[list[ExporterProcess]]:
    """Exporters the test starts (`start`), each stopped afterwards."""
    started: list[ExporterProcess] = []
    yield started
    for e in started:
        e.stop()


def start(
    started: list[ExporterProcess], config: Path, env_extra: dict[str, str] | None = None
) -> ExporterProcess:
    port = free_port()
    log = config.parent / f"exporter-{port}.log"
    env = {**os.environ, "DROVER_CONFIG": str(config), **(env_extra or {})}
    if not env_extra:
        env.pop("DROVER_REDIS_URL", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "exporter", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    e = ExporterProcess(proc, port, log)
    started.append(e)
    wait_until(e.answers, START_TIMEOUT_S, "the exporter answers a scrape")
    return e


def submit(store: JobStore, domain: str, src: str, dst: str, **kw: object) -> str:
    return enqueue(store, MigrationSpec(domain=domain, src=src, dst=dst), origin="t", **kw)  # type: ignore[arg-type]


def walk(store: JobStore, job_id: str, *states: JobState) -> None:
    for state in states:
        assert store.transition(job_id, state, host="t", reason="test")[0], state


FORWARD = (JobState.PREFLIGHT, JobState.PREPARED, JobState.MIGRATING, JobState.FINISHING)


def build_fleet(config: Path) -> dict[str, str]:
    """Jobs in several states, waiting lines behind two gates, a running evacuation with a
    plan of two guests (one moved), a failed evacuation, a schedule, a heartbeat, a host in
    maintenance; returns the ids the assertions name."""
    settings = load_settings(config)
    store = JobStore.from_settings(settings, retry_for=0)
    admission = Admission(store)
    ids = {
        "migrating": submit(store, "m", "kvm1", "kvm2"),
        "admitted": submit(store, "q", "kvm2", "kvm3"),
    }
    admission.pass_(settings, lambda job_id, spec: None)
    admission.safety_pass(settings, lambda job_id, spec: None)  # both heads admitted
    walk(store, ids["migrating"], *FORWARD[:3])
    ids["blocked1"] = submit(store, "b1", "kvm1", "kvm3")
    ids["blocked2"] = submit(store, "b2", "kvm1", "kvm3")
    admission.safety_pass(settings, lambda job_id, spec: None)  # kvm1 outbound: limit 1, held
    ids["fresh"] = submit(store, "f", "kvm3", "kvm1")  # in line, not tried yet
    for name, end in (("ok", JobState.SUCCEEDED), ("bad", JobState.FAILED)):
        ids[name] = submit(store, name, "kvm3", "kvm2")
        walk(store, ids[name], *((*FORWARD, end) if end is JobState.SUCCEEDED else (end,)))
    ids["gone"] = submit(store, "gone", "kvm2", "kvm1")
    walk(store, ids["gone"], JobState.CANCELLED)

    evacuations = EvacuationStore(store)
    ids["evacuation"] = evacuations.create(EvacuationSpec(host="kvm3"), "t")
    evacuations.transition(ids["evacuation"], EvacuationState.PLANNING)
    plan = [
        Placement(domain=d, uuid=f"uuid-{d}", memory_mib=64, active=True, persistent=False)
        for d in ("g1", "g2")
    ]
    evacuations.save_plan(ids["evacuation"], plan)
    evacuations.transition(ids["evacuation"], EvacuationState.RUNNING)
    ids["child"] = submit(store, "g1", "kvm3", "kvm2", parent=ids["evacuation"])
    walk(store, ids["child"], *FORWARD, JobState.SUCCEEDED)
    ids["failed_evacuation"] = evacuations.create(EvacuationSpec(host="kvm2"), "t")
    evacuations.transition(ids["failed_evacuation"], EvacuationState.FAILED, reason="test")

    schedules = ScheduleStore(settings)
    assert schedules.index_key == SCHEDULE_INDEX
    ids["schedule"] = schedules.add_evacuation(
        EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="t"
    ).id
    store.heartbeat("kvm1", ttl_s=600)
    Maintenance(store.r).disable("kvm2", "disk swap", by="t")
    return ids


def test_the_active_exporter_serves_the_fleet_as_redis_holds_it(
    config_fast: Path, exporters: list[ExporterProcess]
) -> None:
    ids = build_fleet(config_fast)
    e = start(exporters, config_fast)
    wait_until(e.active, START_TIMEOUT_S, "the exporter takes the lease")
    got = e.scrape()

    def value(name: str, **labels: str) -> float | None:
        return got.get((f"drover_{name}", tuple(sorted(labels.items()))))

    assert value("exporter_redis_up") == 1
    # queued: the admitted one not started, two behind kvm1's outbound limit, one not tried
    expected_jobs = {"queued": 4, "migrating": 1, "succeeded": 2, "failed": 1, "cancelled": 1}
    for state in JobState:
        assert value("jobs", state=state.value) == expected_jobs.get(state.value, 0), state
    assert value("jobs_waiting", gate="out:kvm1") == 2
    assert value("jobs_waiting", gate="none") == 1
    assert value("evacuations", state="running") == 1
    assert value("evacuations", state="failed") == 1  # not counted among the jobs
    assert value("evacuation_guests_left", evacuation=ids["evacuation"], host="kvm3") == 1
    assert value("workers_alive", host="kvm1") == 1
    assert value("workers_alive", host="kvm2") == 0
    assert value("hosts_in_maintenance") == 1
    since = value("host_maintenance_since_timestamp_seconds", host="kvm2")
    assert since is not None and abs(since - datetime.now(UTC).timestamp()) < 3600
    sid = ids["schedule"]
    assert value("schedules", schedule_id=sid, action="evacuate", host="kvm2", kind="cron") == 1
    fire = value("schedule_next_fire_timestamp_seconds", schedule_id=sid)
    assert fire is not None
    when = datetime.fromtimestamp(fire, UTC)
    assert (when.hour, when.minute) == (3, 0)
    assert timedelta(0) < when - datetime.now(UTC) <= timedelta(days=1)
    # A host added to the registry is in the next scrape, without a restart.
    write_config(config_fast, load_settings(config_fast).redis_url, hosts=4)
    wait_until(
        lambda: ("drover_workers_alive", (("host", "kvm4"),)) in e.scrape(),
        START_TIMEOUT_S,
        "kvm4 in the scrape",
    )


def test_one_of_two_exporters_is_active_and_the_other_takes_over_when_it_dies(
    config_fast: Path, exporters: list[ExporterProcess]
) -> None:
    first = start(exporters, config_fast)
    second = start(exporters, config_fast)
    wait_until(lambda: first.active() or second.active(), START_TIMEOUT_S, "one exporter active")
    active, standby = (first, second) if first.active() else (second, first)
    assert not standby.active()
    # A standby serves only that it is one: Prometheus gets the fleet's series once.
    assert standby.scrape() == {("drover_exporter_active", ()): 0.0}
    assert ("drover_jobs", (("state", "queued"),)) in active.scrape()
    active.proc.kill()  # no goodbye: the lease must lapse
    active.proc.wait()
    wait_until(standby.active, TAKEOVER_TIMEOUT_S, "the standby takes over")
    assert ("drover_exporter_redis_up", ()) in standby.scrape()
    assert standby.stop() == 0  # SIGTERM: a clean exit
    assert (
        Lease(
            redis.Redis.from_url(load_settings(config_fast).redis_url), EXPORTER_LEASE, 1
        ).holder()
        is None
    )


def test_a_scrape_while_redis_is_silent_says_so_and_shows_no_fleet(
    tmp_path: Path, exporters: list[ExporterProcess]
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        config = write_config(tmp_path / "drover.toml", server.url, LONG_LEASE)
        e = start(exporters, config)
        wait_until(e.active, START_TIMEOUT_S, "the exporter takes the lease")
        os.kill(server.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            got = e.scrape()
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert got[("drover_exporter_redis_up", ())] == 0
        assert not any(name.startswith("drover_jobs") for name, _ in got)
        wait_until(
            lambda: e.scrape().get(("drover_exporter_redis_up", ())) == 1,
            START_TIMEOUT_S,
            "the figures come back with Redis",
        )
        server.stop()
        got = e.scrape()
        assert got[("drover_exporter_redis_up", ())] == 0
        assert not any(name.startswith("drover_workers") for name, _ in got)
    finally:
        server.stop()


def test_the_exporter_runs_as_the_producer_acl_user(
    tmp_path: Path, exporters: list[ExporterProcess]
) -> None:
    server = AclRedis(tmp_path / "acl-redis", BrokerNames())
    try:
        config = write_config(tmp_path / "drover.toml", server.url(PRODUCER))
        build_fleet(config)
        server.admin.acl_log_reset()
        e = start(exporters, config)
        wait_until(e.active, START_TIMEOUT_S, "the exporter takes the lease")
        assert e.scrape()[("drover_exporter_redis_up", ())] == 1
        assert server.denials() == []
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listen", "nonsense"], "is not ADDR:PORT"),
        (["--listen", "127.0.0.1:0"], "the port must be 1 to 65535"),
        (["--listen", "127.0.0.1:99999"], "the port must be 1 to 65535"),
        (["--listen", "::1:9640"], "IPv6 address in brackets"),
        (["--listen", "0.0.0.0:9640"], "add --expose-all"),
        (["--listen", "[::]:9640"], "add --expose-all"),
        (["--listen", "bad host!:9640"], "not an IP address or host name"),
        (["--port", "9640"], "No such option"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(config_fast: Path, args: list[str], says: str) -> None:
    done = run_drover(config_fast, "exporter", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_the_lease_is_renewed_only_by_its_holder(redis_srv: RedisServer) -> None:
    r = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    r.delete(EXPORTER_LEASE)
    a, b = (Lease(r, EXPORTER_LEASE, 60) for _ in range(2))
    assert a.renew() and a.held()
    assert not b.renew() and not b.held()
    assert a.renew()  # its own: extended
    r.delete(EXPORTER_LEASE)  # as if it lapsed
    assert b.renew()
    assert not a.renew() and not a.held()  # never over the new holder's
    a.release()
    assert b.holder() == b.token
    b.release()
    assert b.holder() is None


@pytest.fixture
def config_fast(tmp_path: Path, redis_srv: RedisServer) -> Path:
    redis.Redis.from_url(redis_srv.url).flushdb()
    return write_config(tmp_path / "drover.toml", redis_srv.url)


def test_a_taken_port_or_a_lease_renewed_too_rarely_is_one_line(
    config_fast: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_drover(config_fast, "exporter", "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    url = load_settings(config_fast).redis_url
    slow = write_config(
        tmp_path / "slow.toml", url, "exporter_lease_ttl = 5\nexporter_lease_renew = 5\n"
    )
    done = run_drover(slow, "exporter")
    assert done.returncode == 2
    assert "exporter_lease_renew must be shorter than exporter_lease_ttl" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_evacuations_index_keeps_the_retention_only(config_fast: Path) -> None:
    settings = load_settings(config_fast)
    store = JobStore.from_settings(settings, retry_for=0)
    retention_s = store.retention.retention_s
    old = datetime.now(UTC).timestamp() - retention_s - 60
    store.r.zadd(EVACUATIONS_INDEX, {"long-gone": old})
    new = EvacuationStore(store).create(EvacuationSpec(host="kvm1", dry_run=True), "t")
    assert store.r.zrange(EVACUATIONS_INDEX, 0, -1) == [new]


def test_a_password_redis_refuses_stops_it_in_one_line(
    tmp_path: Path, redis_srv: RedisServer
) -> None:
    wrong = redis_srv.url.replace(redis_srv.password, "not-the-password")
    done = run_drover(write_config(tmp_path / "drover.toml", wrong), "exporter")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Redis refused the exporter" in done.stderr
    assert redis_srv.password not in done.stderr
