"""drover's Redis ACL on a real redis-server: each role's real work succeeds, and nothing else.

The server loads the file `render_acl` writes (plus a test-only admin user to look around).
The roles run their own code, in their own processes where drover runs them so: a producer
submits through `Drover`; a real Celery worker (`celery -A config worker`, as the worker
user) consumes its host's queue and runs the phase, which fails on the host's unreachable
libvirtd and retries first; a producer sees its heartbeat (workers obey no remote control);
Flower, as the flower
user, sees the worker through its events and reads the queue lengths; `drover beat`, as the
beat user, holds its lock and fires a schedule that the worker then runs. Redis's ACL log must
stay empty for all of it: a refused command that some library logged and retried would show
there. Then every role is refused what it must not do, with and without remote control.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config.celery import host_queue, make_app, worker_node
from config.redis_acl import (
    BEAT,
    DEFAULT_USER_RULE,
    FLOWER,
    HEALTH_USER,
    PRODUCER,
    ROLES,
    WORKER,
    BrokerNames,
    render_acl,
    role_url,
    user_name,
)
from config.settings import ConfigError, Settings, load_settings
from jobs.keys import SCHEDULE_LOCK
from jobs.spec import MigrationSpec
from jobs.store import JobStore, heartbeat_key
from lab import redis_server
from lab.proc import kill
from producer.api import Drover
from schedules.records import EvacuationRequest
from schedules.store import ScheduleStore
from tests.conftest import free_port
from tests.support.pki import LoopbackPki
from tests.support.process import terminate
from tests.support.registry import with_state_dirs

REPO = Path(__file__).resolve().parents[2]
ADMIN_USER = "test-admin"
ACL_LOG_MAX = 1000  # ACL LOG shows 10 entries unless asked for more
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0
POLL_S = 0.1
FIRE_AHEAD_S = 2
# A socket nobody listens on: kvm1's libvirtd is unreachable, so its phases fail (after their
# retries, which are fast here) without touching any hypervisor.
NO_LIBVIRT = "/nonexistent/drover-acl-test/libvirt-sock"

CONFIG = """
redis_url = "{url}"

[security]
insecure = true

[tunables]
retry_delay = 0.1
heartbeat_interval = 0.5

[hosts.kvm1]
libvirt_uri = "qemu+unix:///system?socket={no_libvirt}"
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"

[hosts.kvm2]
libvirt_uri = "qemu+unix:///system?socket={no_libvirt}"
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
"""


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def unretried(**kwargs: Any) -> redis.Redis:
    """A client that takes a refusal as final: redis-py retries an AuthenticationError (a
    ConnectionError) with a backoff of seconds, which proves nothing here."""
    return redis.Redis(retry=Retry(NoBackoff(), 0), **kwargs)


def unretried_from_url(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


class AclRedis:
    """A redis-server of its own with drover's ACL users, and an admin to look with."""

    def __init__(
        self, data_dir: Path, names: BrokerNames, extra: Callable[[], list[str]] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.names = names
        self.port = free_port()
        self.passwords = {role: redis_server.new_password() for role in ROLES}
        self.admin_password = redis_server.new_password()
        self.acl = render_acl(self.passwords, names)
        self.pid = redis_server.start_with_acl(
            data_dir,
            self.port,
            ["127.0.0.1"],
            self.acl + f"user {ADMIN_USER} on >{self.admin_password} ~* &* +@all\n",
            extra() if extra else None,
        )
        self.admin = redis.Redis(
            port=self.port,
            username=ADMIN_USER,
            password=self.admin_password,
            decode_responses=True,
        )

    def url(self, role: str) -> str:
        return role_url(f"redis://127.0.0.1:{self.port}/0", role, self.passwords[role])

    def client(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(role), decode_responses=True)

    def denials(self) -> list[str]:
        """What Redis refused any drover user since the log was last reset, one line each."""
        return [
            f"{e['username']}: {e['reason']} {e['object']} ({e['context']})"
            for e in self.admin.acl_log(count=ACL_LOG_MAX)
            if e["username"] != ADMIN_USER
        ]

    def stop(self) -> None:
        self.admin.close()
        kill([self.pid])


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """The fleet's Redis, with the ACL for today's Celery config (remote control on)."""
    server = AclRedis(tmp_path_factory.mktemp("acl-redis"), BrokerNames())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def config(acl_redis: AclRedis, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """drover.toml as producers have it: the producer user in redis_url."""
    path = tmp_path_factory.mktemp("acl-config") / "drover.toml"
    path.write_text(
        with_state_dirs(
            CONFIG.format(url=acl_redis.url(PRODUCER), no_libvirt=NO_LIBVIRT), path.parent / "state"
        )
    )
    return path


def settings_as(config: Path, acl_redis: AclRedis, role: str) -> Settings:
    return load_settings(config).model_copy(update={"redis_url": acl_redis.url(role)})


def role_env(config: Path, acl_redis: AclRedis, role: str) -> dict[str, str]:
    """A drover process's environment for `role`: its URL from the environment, as compose
    and the lab give it, never on the command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    return env | {"DROVER_CONFIG": str(config), "DROVER_REDIS_URL": acl_redis.url(role)}


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        return terminate(self.proc, STOP_TIMEOUT_S)


def spawn(argv: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(proc, log)


@pytest.fixture(scope="module")
def worker(
    config: Path, acl_redis: AclRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """kvm1's Celery worker as the worker user, as `drover worker` runs it (without the
    libvirt check at start-up: kvm1 has no libvirtd), its heartbeat seen by a producer."""
    acl_redis.admin.acl_log_reset()
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker"]
    argv += ["--hostname", worker_node("kvm1"), "--queues", host_queue("kvm1")]
    argv += ["--without-mingle", "--without-gossip", "--task-events", "--loglevel", "INFO"]
    log = tmp_path_factory.mktemp("acl-worker") / "worker.log"
    process = spawn(argv, role_env(config, acl_redis, WORKER), log)
    store = JobStore.from_url(settings_as(config, acl_redis, PRODUCER).redis_url)

    def answers() -> bool:
        assert process.proc.poll() is None, process.text()
        try:
            return store.alive("kvm1")
        except redis.exceptions.NoPermissionError:
            raise AssertionError(acl_redis.denials()) from None

    try:
        wait_for(answers, START_TIMEOUT_S, "the worker's heartbeat")
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def producer(config: Path, acl_redis: AclRedis) -> Drover:
    return Drover(settings_as(config, acl_redis, PRODUCER))


# --- the file ---------------------------------------------------------------------------------


def test_a_restart_keeps_every_transaction_written_through_the_acl_users(
    tmp_path: Path,
) -> None:
    """Job records are written in MULTI/EXEC blocks; Redis replays its AOF as the default
    user and re-checks those blocks against it (redis#14541): nothing may be lost."""
    server = AclRedis(tmp_path / "redis", BrokerNames())
    try:
        store = JobStore.from_url(server.url(PRODUCER))
        spec = MigrationSpec(domain="web01", src="kvm1", dst="kvm2")
        job_ids = [store.create(spec, host="producer@test") for _ in range(3)]
        # The default user's rules are all, but nobody can act as it.
        with pytest.raises(redis.exceptions.AuthenticationError):
            unretried(port=server.port).execute_command("AUTH", "default", "")
        with pytest.raises(redis.exceptions.AuthenticationError):
            unretried(port=server.port).get(f"drover:job:{job_ids[0]}")
        conf = server.data_dir / "redis.conf"
        kill([server.pid])  # SIGTERM: Redis flushes its AOF and exits
        server.pid = redis_server.run_with(
            conf, "127.0.0.1", server.port, redis_server.HEALTH_PASSWORD, username=HEALTH_USER
        )
        store = JobStore.from_url(server.url(PRODUCER))
        assert [store.get(j).spec for j in job_ids] == [spec] * 3
        assert "NOPERM" not in (server.data_dir / "redis.log").read_text()
    finally:
        server.stop()


def test_the_file_holds_hashes_and_turns_the_default_user_off(acl_redis: AclRedis) -> None:
    lines = acl_redis.acl.splitlines()
    assert lines[0].startswith("user default off ")
    assert not any(p in acl_redis.acl for p in acl_redis.passwords.values())
    assert lines[0] == DEFAULT_USER_RULE  # off: nobody logs in as it (see the restart test)
    roles_only = "\n".join(lines[1:])
    assert "+@all" not in roles_only and " ~* " not in roles_only
    assert {line.split()[1] for line in lines} == {"default", HEALTH_USER} | {
        user_name(r) for r in ROLES
    }
    assert stat.S_IMODE((acl_redis.data_dir / redis_server.ACL_FILE).stat().st_mode) == 0o600
    with pytest.raises(redis.AuthenticationError):
        unretried(port=acl_redis.port).ping()
    health = redis.Redis(port=acl_redis.port, username=HEALTH_USER, password="anything")
    assert health.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("drover:jobs")


@pytest.mark.parametrize("remote_control", [True, False])
def test_the_rules_in_the_documentation_are_the_rendered_ones(remote_control: bool) -> None:
    """docs/redis-acl.md shows every user's exact rules, with and without remote control."""
    doc = (REPO / "docs" / "redis-acl.md").read_text()
    lines = render_acl(
        {role: f"{role}-0123456789abcdef" for role in ROLES},
        BrokerNames(remote_control=remote_control),
    ).splitlines()
    for line in lines:
        shown = re.sub(r" #[0-9a-f]{64}", " #<sha256>", line)
        assert shown in doc, shown


def test_a_wrong_password_is_refused(acl_redis: AclRedis) -> None:
    url = role_url(f"redis://127.0.0.1:{acl_redis.port}/0", WORKER, "0" * 32)
    with pytest.raises(redis.AuthenticationError):
        unretried_from_url(url).ping()


# --- each role's real work --------------------------------------------------------------------


def test_producer_submits_admits_publishes_and_schedules(acl_redis: AclRedis, config: Path) -> None:
    """No worker consumes kvm2's queue: the job is recorded, admitted and its first phase
    waits there as a task message."""
    acl_redis.admin.acl_log_reset()
    drover = Drover(settings_as(config, acl_redis, PRODUCER))
    before = acl_redis.admin.llen(host_queue("kvm2"))
    job_id = drover.submit(domain="web02", src="kvm2", dst="kvm1", live=True)
    job = drover.job(job_id)
    assert job.admitted is not None, job
    assert acl_redis.admin.llen(host_queue("kvm2")) == before + 1
    assert drover.jobs(5)[0].id == job_id
    assert [e["event"] for e in drover.events(job_id)]
    assert drover.abort(job_id) == f"job {job_id} cancelled (queued)"
    assert drover.job(job_id).state.value == "cancelled"
    drover.set_host_enabled("kvm2", False)
    drover.set_host_enabled("kvm2", True)

    store = ScheduleStore(settings_as(config, acl_redis, PRODUCER))
    added = store.add_evacuation(EvacuationRequest(host="kvm2"), cron="0 3 * * *", by="test")
    assert [s.id for s in store.list()] == [added.id]
    store.remove(added.id)
    assert store.list() == []
    assert acl_redis.denials() == []


def test_a_start_that_fails_after_recording_is_said_not_swallowed(
    acl_redis: AclRedis, config: Path
) -> None:
    """The job is recorded and in line, so submit returns its id; the failed start is one
    line through `notice`, never a silent drop."""
    notices: list[str] = []
    drover = Drover(settings_as(config, acl_redis, PRODUCER), notice=notices.append)

    def broken(_: object) -> None:
        raise OSError("the broker hung up")

    drover.send = broken  # type: ignore[method-assign]
    job_id = drover.submit(domain="web05", src="kvm2", dst="kvm1", live=True)
    assert drover.job(job_id).state.value == "queued"
    assert notices == [
        f"job {job_id} is in line; starting it here failed (the broker hung up); "
        "a worker's admission tick starts it"
    ]
    said = drover.abort(job_id)  # the cancel stands; its notice to the hosts could not go
    assert said.startswith(f"job {job_id} cancelled (queued); its hosts could not be told"), said
    assert "the broker hung up" in said and "\n" not in said


def test_worker_consumes_its_queue_and_ends_the_job_itself(
    acl_redis: AclRedis, producer: Drover, worker: Process
) -> None:
    """The phase runs in the worker (claim, retries through its own queue, terminal
    transition, events); only the worker can have failed the job on kvm1's libvirtd."""
    acl_redis.admin.acl_log_reset()
    job_id = producer.submit(domain="web01", src="kvm1", dst="kvm2", live=True)
    job = producer.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.value == "failed", job
    assert job.phases["source_preflight"].host == "kvm1"
    assert NO_LIBVIRT in (job.reason or ""), job.reason
    events = [e["event"] for e in producer.events(job_id)]
    assert "phase.started" in events, events
    assert acl_redis.admin.exists(heartbeat_key("kvm1"))
    assert producer.store.alive("kvm1")

    evacuation_id = producer.evacuate(host="kvm1", dry_run=True)
    evacuation = producer.wait_evacuation(evacuation_id, timeout=JOB_TIMEOUT_S)
    assert evacuation.state.value == "failed", evacuation  # kvm1's worker could not plan
    assert acl_redis.denials() == [], worker.text()[-3000:]


def test_flower_user_receives_the_workers_events(
    acl_redis: AclRedis, config: Path, worker: Process
) -> None:
    """A Celery event receiver, as Flower runs one, sees kvm1's worker heartbeats."""
    acl_redis.admin.acl_log_reset()
    app = make_app(settings_as(config, acl_redis, FLOWER))
    seen: list[dict[str, Any]] = []

    def heartbeats() -> list[dict[str, Any]]:
        return [
            e
            for e in seen
            if e.get("hostname") == worker_node("kvm1") and e.get("type") == "worker-heartbeat"
        ]

    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        stop = threading.Timer(EVENT_TIMEOUT_S, lambda: setattr(receiver, "should_stop", True))
        stop.start()
        try:
            for _ in receiver.itercapture(limit=None, timeout=EVENT_TIMEOUT_S, wakeup=False):
                if heartbeats():
                    break
        finally:
            stop.cancel()
    assert heartbeats(), [e.get("type") for e in seen]
    assert acl_redis.denials() == []


FLOWER_USER, FLOWER_PASSWORD = "operator", "flower-0123456789abcdef"


def http_get(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
        return int(resp.status), resp.read().decode()


def test_flower_as_the_flower_user_shows_the_worker_and_queue_lengths(
    acl_redis: AclRedis, config: Path, worker: Process, tmp_path: Path
) -> None:
    acl_redis.admin.acl_log_reset()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = role_env(config, acl_redis, FLOWER) | {
        "DROVER_FLOWER_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"
    }
    flower = spawn(
        [sys.executable, "-m", "cli", "flower", "--port", str(port)],
        env,
        tmp_path / "flower.log",
    )

    def worker_alive() -> bool:
        assert flower.proc.poll() is None, flower.text()
        try:
            status, body = http_get(f"{base}/api/workers?status=true")
        except OSError:
            return False
        return status == 200 and json.loads(body).get(worker_node("kvm1")) is True

    try:
        try:
            wait_for(worker_alive, START_TIMEOUT_S, "Flower to see kvm1's worker in its events")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {acl_redis.denials()}\n{flower.text()[-3000:]}") from None
        status, body = http_get(f"{base}/api/queues/length")
        assert status == 200
        names = {q["name"] for q in json.loads(body)["active_queues"]}
        assert host_queue("kvm1") in names, body
    finally:
        flower.stop()
    assert acl_redis.denials() == [], flower.text()[-3000:]


def test_beat_holds_its_lock_and_fires_a_schedule_the_worker_runs(
    acl_redis: AclRedis, config: Path, worker: Process, producer: Drover, tmp_path: Path
) -> None:
    acl_redis.admin.acl_log_reset()
    beat = spawn(
        [sys.executable, "-m", "cli", "beat"],
        role_env(config, acl_redis, BEAT),
        tmp_path / "beat.log",
    )
    store = ScheduleStore(producer.settings)
    try:
        wait_for(lambda: "Acquired lock" in beat.text(), START_TIMEOUT_S, beat.text)
        at = (datetime.now(UTC) + timedelta(seconds=FIRE_AHEAD_S)).replace(microsecond=0)
        at = at.isoformat()  # whole seconds: --at refuses a fraction
        added = store.add_evacuation(EvacuationRequest(host="kvm1"), at=at, by="test")
        wait_for(
            lambda: store.get(added.id).last_run is not None, JOB_TIMEOUT_S, "the worker's run"
        )
        run = store.get(added.id).last_run
        assert run is not None and run.evacuation_id, run  # started by kvm1's worker
        assert beat.stop() == 0, beat.text()[-3000:]
        assert acl_redis.admin.get(SCHEDULE_LOCK) is None  # released with redis-py's Lua script
    finally:
        beat.stop()
        store.remove(added.id) if "added" in locals() else None
        producer.set_host_enabled("kvm1", True)
    assert acl_redis.denials() == [], beat.text()[-3000:]


def test_worker_stops_cleanly_as_the_worker_user(acl_redis: AclRedis, worker: Process) -> None:
    """A warm shutdown removes its pidbox binding and queue (SREM, DEL) without a denial."""
    acl_redis.admin.acl_log_reset()
    assert worker.stop() == 0, worker.text()[-3000:]
    assert "NOPERM" not in worker.text()
    assert acl_redis.denials() == []


# --- what each role must not do ---------------------------------------------------------------

ANY_ROLE_REFUSED: list[tuple[str, ...]] = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "SET", "appendonly", "no"),
    ("CONFIG", "GET", "*"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "intruder", "on", ">x", "+@all", "~*"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("INFO",),
    ("SAVE",),
    ("MODULE", "LIST"),
    ("MONITOR",),
    ("CLIENT", "LIST"),
    ("SHUTDOWN", "NOSAVE"),
    ("SCRIPT", "FLUSH"),
    ("FUNCTION", "FLUSH"),
    ("SWAPDB", "0", "1"),
    ("SET", "elsewhere:key", "x"),
    ("GET", "elsewhere:key"),
]
ROLE_REFUSED: dict[str, list[tuple[str, ...]]] = {
    PRODUCER: [
        ("BRPOP", "drover.host.kvm1", "1"),  # take a host's task messages
        ("LRANGE", "drover.host.kvm1", "0", "-1"),  # read them
        ("PSUBSCRIBE", "/0.celeryev/*"),
    ],
    WORKER: [
        ("PUBLISH", "/0.elsewhere", "x"),
        ("SET", "drover.default", "x"),
    ],
    FLOWER: [
        ("HGETALL", "drover:job:0123456789ab"),  # no job record
        ("XRANGE", "drover:job:0123456789ab:events", "-", "+"),
        ("SET", "drover:hosts:disabled", "x"),
        ("LPUSH", "drover.host.kvm1", "{}"),  # no task message injected
        ("LRANGE", "drover.host.kvm1", "0", "-1"),  # lengths only, never the messages
        ("BRPOP", "drover.host.kvm1", "1"),
    ],
    BEAT: [
        ("HGETALL", "drover:job:0123456789ab"),  # schedules only
        ("SADD", "drover:active", "0123456789ab"),
        ("BRPOP", "drover.host.kvm1", "1"),
        ("HSET", "unacked", "tag", "x"),
        ("PSUBSCRIBE", "/0.celeryev/*"),
    ],
}
# How Redis words a refusal of a command a Lua script calls (the script runs as its caller).
SCRIPT_REFUSED = "The user executing the script can't"
WITHOUT_REMOTE_CONTROL_REFUSED: dict[str, list[tuple[str, ...]]] = {
    role: [
        ("PUBLISH", "/0.celery.pidbox", "{}"),
        ("SADD", "_kombu.binding.reply.celery.pidbox", "x"),
        ("LPUSH", "x.reply.celery.pidbox", "{}"),
    ]
    for role in ROLES
}
# Only a consumer of reply queues needs kombu's restore keys besides the worker.
WITHOUT_REMOTE_CONTROL_REFUSED[PRODUCER] += [("HSET", "unacked", "tag", "x")]
WITHOUT_REMOTE_CONTROL_REFUSED[FLOWER] += [
    ("HSET", "unacked", "tag", "x"),
    # Flower runs kombu 5.7's binding scripts, but a script of its own reaches no job.
    ("EVAL", "return redis.call('HGETALL', KEYS[1])", "1", "drover:job:0123456789ab"),
    ("EVAL", "return redis.call('FLUSHALL')", "0"),
    ("PUBLISH", "/0.celeryev/worker.heartbeat", "{}"),  # no forged events
]


@pytest.fixture(scope="module", params=[True, False], ids=["remote-control", "no-remote-control"])
def sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AclRedis]:
    """A Redis of its own for refusals, so they never land in the fleet's ACL log."""
    server = AclRedis(
        tmp_path_factory.mktemp("acl-sandbox"), BrokerNames(remote_control=request.param)
    )
    server.admin.set("elsewhere:key", "kept")
    yield server
    server.stop()


def refused(sandbox: AclRedis, role: str) -> list[tuple[str, ...]]:
    extra = [] if sandbox.names.remote_control else WITHOUT_REMOTE_CONTROL_REFUSED[role]
    return ANY_ROLE_REFUSED + ROLE_REFUSED[role] + extra


@pytest.mark.parametrize("role", ROLES)
def test_a_role_is_refused_what_it_must_not_do(sandbox: AclRedis, role: str) -> None:
    sandbox.admin.acl_log_reset()
    client = sandbox.client(role)
    assert client.ping()
    commands = refused(sandbox, role)
    allowed = []
    for command in commands:
        try:
            client.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as exc:  # a script's call refused by the ACL
            if SCRIPT_REFUSED in str(exc):
                continue
            raise
        allowed.append(command)
    assert allowed == []
    client.close()
    assert sandbox.admin.get("elsewhere:key") == "kept"
    assert sandbox.admin.ping()  # not shut down, not flushed
    denials = sandbox.denials()  # Redis logs each refusal (alike ones once, counted)
    assert denials and all(d.startswith(f"{user_name(role)}: ") for d in denials), denials


def test_without_remote_control_the_roles_still_do_their_work(
    sandbox: AclRedis, tmp_path: Path
) -> None:
    """The narrower file still lets a producer submit, and Flower count a queue."""
    config = tmp_path / "drover.toml"
    config.write_text(
        with_state_dirs(CONFIG.format(url=sandbox.url(PRODUCER), no_libvirt=NO_LIBVIRT), tmp_path)
    )
    sandbox.admin.acl_log_reset()
    drover = Drover(load_settings(config))
    job_id = drover.submit(domain="web03", src="kvm2", dst="kvm1", live=True)
    assert drover.job(job_id).admitted is not None
    assert sandbox.client(FLOWER).llen(host_queue("kvm2")) >= 1
    assert sandbox.denials() == []
    store = JobStore.from_url(sandbox.url(WORKER))
    assert store.state(job_id).value == "queued"


# --- refusing what would not work -------------------------------------------------------------


def test_passwords_are_checked_without_showing_them() -> None:
    good = {role: f"{role}-0123456789abcdef" for role in ROLES}
    with pytest.raises(ConfigError, match="DROVER_REDIS_FLOWER_PASSWORD must be 16"):
        render_acl(good | {FLOWER: "short"})
    with pytest.raises(ConfigError, match="only letters") as caught:
        render_acl(good | {BEAT: "has a space in it, 0123"})
    assert "space" not in str(caught.value)
    with pytest.raises(ConfigError, match="a password of its own"):
        render_acl(good | {BEAT: good[WORKER]})
    with pytest.raises(ConfigError, match="no password for role producer"):
        render_acl({r: p for r, p in good.items() if r != PRODUCER})


# --- TLS: the rediss:// form docs/redis-acl.md and docker-compose.yml give workers -------------


def test_rediss_url_with_the_ca_serves_every_client(tmp_path: Path) -> None:
    """The job store (redis-py), the broker (kombu) and redbeat all read the URL's
    ssl_cert_reqs and ssl_ca_certs: a producer submits over TLS, a schedule lists."""
    pki = LoopbackPki.create(tmp_path / "pki")
    server = pki.issue("server")
    tls_port = free_port()
    tls = [
        f"tls-port {tls_port}",
        f"tls-cert-file {server.cert}",
        f"tls-key-file {server.key}",
        f"tls-ca-cert-file {pki.ca.cert}",
        "tls-auth-clients no",  # the ACL password authenticates the client
    ]
    acl = AclRedis(tmp_path / "redis", BrokerNames(), extra=lambda: tls)
    try:
        query = f"ssl_cert_reqs=required&ssl_ca_certs={pki.ca.cert}"
        base = f"rediss://127.0.0.1:{tls_port}/0?{query}"
        url = role_url(base, PRODUCER, acl.passwords[PRODUCER])
        config = tmp_path / "drover.toml"
        config.write_text(with_state_dirs(CONFIG.format(url=url, no_libvirt=NO_LIBVIRT), tmp_path))
        settings = load_settings(config)
        drover = Drover(settings)
        job_id = drover.submit(domain="web04", src="kvm2", dst="kvm1", live=True)
        assert drover.job(job_id).admitted is not None
        assert acl.admin.llen(host_queue("kvm2")) == 1  # published by kombu, over TLS
        assert ScheduleStore(settings).list() == []  # redbeat's own client, over TLS
        assert acl.denials() == []
        wrong = tmp_path / "other-ca.pem"
        wrong.write_text(LoopbackPki.create(tmp_path / "other").ca.cert.read_text())
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(url.replace(str(pki.ca.cert), str(wrong))).ping()
    finally:
        acl.stop()


# --- rotation ---------------------------------------------------------------------------------


def test_a_role_being_rotated_has_both_passwords_until_the_previous_goes(tmp_path: Path) -> None:
    old, new = "old-worker-0123456789abcdef", "new-worker-0123456789abcdef"
    passwords = {role: f"{role}-0123456789abcdef" for role in ROLES} | {WORKER: new}
    env = {f"DROVER_REDIS_{r.upper()}_PASSWORD": p for r, p in passwords.items()}
    rotating = redis_acl_cli(tmp_path, env=env | {"DROVER_REDIS_WORKER_PASSWORD_PREVIOUS": old})
    assert rotating.returncode == 0, rotating.stderr
    done = redis_acl_cli(tmp_path, env=env)
    assert done.returncode == 0, done.stderr

    def accepted(acl: str, password: str) -> bool:
        port = free_port()
        pid = redis_server.start_with_acl(tmp_path / f"redis-{port}", port, ["127.0.0.1"], acl)
        try:
            unretried_from_url(role_url(f"redis://127.0.0.1:{port}/0", WORKER, password)).ping()
        except redis.AuthenticationError:
            return False
        finally:
            kill([pid])
        return True

    assert accepted(rotating.stdout, old) and accepted(rotating.stdout, new)
    assert accepted(done.stdout, new) and not accepted(done.stdout, old)


# --- `drover redis-acl` -----------------------------------------------------------------------

CLI_TIMEOUT_S = 60
CLI_PASSWORDS = {role: f"{role}-{'0123456789abcdef' * 2}" for role in ROLES}


def redis_acl_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`drover redis-acl ARGS` with no config file and no passwords but `env`'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DROVER_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", "redis-acl", *args],
        cwd=tmp_path,  # no ./drover.toml: the defaults (database 0)
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


def test_cli_renders_from_a_private_passwords_file_into_a_private_acl_file(
    tmp_path: Path,
) -> None:
    """The compose .env format, comments and quotes included; Redis loads what it writes."""
    secrets_file = tmp_path / ".env"
    secrets_file.write_text(
        "# drover's .env\n"
        + "".join(
            f"DROVER_REDIS_{role.upper()}_PASSWORD={quoted}  # {role}\n"
            if role != BEAT
            else f'export DROVER_REDIS_BEAT_PASSWORD="{quoted}"\n'
            for role, quoted in CLI_PASSWORDS.items()
        )
        + "DROVER_HOST=kvm-07\n"
    )
    secrets_file.chmod(0o600)
    output = tmp_path / "users.acl"
    result = redis_acl_cli(tmp_path, "--passwords-file", str(secrets_file), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert output.read_text() == render_acl(CLI_PASSWORDS)
    port = free_port()
    pid = redis_server.start_with_acl(tmp_path / "redis", port, ["127.0.0.1"], output.read_text())
    try:
        url = role_url(f"redis://127.0.0.1:{port}/0", PRODUCER, CLI_PASSWORDS[PRODUCER])
        assert redis.Redis.from_url(url).ping()
    finally:
        kill([pid])


def test_cli_takes_passwords_from_the_environment(tmp_path: Path) -> None:
    env = {f"DROVER_REDIS_{r.upper()}_PASSWORD": p for r, p in CLI_PASSWORDS.items()}
    result = redis_acl_cli(tmp_path, "--no-remote-control", "--db", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_acl(CLI_PASSWORDS, BrokerNames(db=3, remote_control=False))
    assert "&/3.celeryev/*" in result.stdout and "pidbox" not in result.stdout


def test_cli_refuses_a_passwords_file_others_can_read(tmp_path: Path) -> None:
    secrets_file = tmp_path / ".env"
    secrets_file.write_text(
        "".join(f"DROVER_REDIS_{r.upper()}_PASSWORD={p}\n" for r, p in CLI_PASSWORDS.items())
    )
    secrets_file.chmod(0o644)
    result = redis_acl_cli(tmp_path, "--passwords-file", str(secrets_file))
    line = one_line_error(result)
    assert (
        line == f"drover: {secrets_file} is mode 0644; it holds passwords: chmod 600 {secrets_file}"
    )
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "drover: no password for role worker: set DROVER_REDIS_WORKER_PASSWORD"),
        (
            {f"DROVER_REDIS_{r.upper()}_PASSWORD": "tooshort" for r in ROLES},
            "drover: DROVER_REDIS_WORKER_PASSWORD must be 16 to 256 characters",
        ),
    ],
)
def test_cli_refuses_missing_or_weak_passwords_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    result = redis_acl_cli(tmp_path, env=env)
    assert one_line_error(result).startswith(message)
    assert "tooshort" not in result.stderr


def test_cli_has_no_password_option(tmp_path: Path) -> None:
    """Nothing on the command line can carry a password (`ps` and shell history show it)."""
    result = redis_acl_cli(tmp_path, "--password", "producer-0123456789abcdef")
    assert "redis-acl: No such option: --password " in one_line_error(result)
    assert result.returncode == 2


def private_passwords_file(tmp_path: Path, content: bytes) -> Path:
    secrets_file = tmp_path / ".env"
    secrets_file.write_bytes(content)
    secrets_file.chmod(0o600)
    return secrets_file


@pytest.mark.parametrize("which", ["not-utf8", "fifo", "empty-path", "empty-output"])
def test_cli_refuses_a_path_or_file_it_cannot_use_in_one_line(tmp_path: Path, which: str) -> None:
    """Bytes that are not UTF-8, a FIFO (reading it would block), an empty path for either
    file (Path("") is ".": it read as a directory): one line saying which and why."""
    lines = "".join(f"DROVER_REDIS_{r.upper()}_PASSWORD={p}\n" for r, p in CLI_PASSWORDS.items())
    good = private_passwords_file(tmp_path, lines.encode())
    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo, 0o600)
    args, message = {
        "not-utf8": (
            ["--passwords-file", str(private_passwords_file(tmp_path, b"\xff\xfe\x00garbage"))],
            f"drover: --passwords-file {tmp_path / '.env'}: not UTF-8 text",
        ),
        "fifo": (
            ["--passwords-file", str(fifo)],
            f"drover: --passwords-file {fifo}: is a FIFO, not a regular file",
        ),
        "empty-path": (["--passwords-file", ""], "drover: --passwords-file: the path is empty"),
        "empty-output": (
            ["--passwords-file", str(good), "-o", ""],
            "drover: --output: the path is empty",
        ),
    }[which]
    result = redis_acl_cli(tmp_path, *args)
    assert one_line_error(result) == message
    assert result.returncode == 2
    assert result.stdout == ""


def test_cli_refuses_a_name_given_twice_in_the_passwords_file(tmp_path: Path) -> None:
    """Two values for one password: which was meant cannot be known (the last one won)."""
    lines = "".join(f"DROVER_REDIS_{r.upper()}_PASSWORD={p}\n" for r, p in CLI_PASSWORDS.items())
    again = f"DROVER_REDIS_WORKER_PASSWORD=other-{'0123456789abcdef' * 2}\n"
    secrets_file = private_passwords_file(tmp_path, (lines + again).encode())
    result = redis_acl_cli(tmp_path, "--passwords-file", str(secrets_file))
    assert one_line_error(result) == (
        f"drover: {secrets_file}:{len(ROLES) + 1}: DROVER_REDIS_WORKER_PASSWORD is given twice "
        "(first on line 1); keep one"
    )
    assert result.returncode == 2
    assert result.stdout == "" and "0123456789abcdef" not in result.stderr


def test_a_worker_may_give_a_stream_run_out_of_ids_its_ids_back(sandbox: AclRedis) -> None:
    """The worker's events go on after an entry written at the largest ID
    (jobs/streams.py `reclaim_ids`): its role is granted each command that takes, as its
    events are written through it."""
    from config.event_publisher import StreamPublisher
    from config.event_shape import EVENTS_RECLAIMED
    from jobs.keys import events_key

    job_id = "0123456789cd"
    sandbox.admin.xadd(events_key(job_id), {"data": "{}"}, id="18446744073709551615-1")
    sandbox.admin.xadd(
        events_key(job_id), {"data": "{}"}, id="18446744073709551615-18446744073709551615"
    )
    sandbox.admin.acl_log_reset()
    store = JobStore.from_url(sandbox.url(WORKER))
    publisher = StreamPublisher(store.without_retry, "kvm1", flush_interval=3600)
    assert publisher.publish(job_id, {"event": "phase.started"})
    assert [ev["event"] for _, ev in store.read_events(job_id)] == [
        EVENTS_RECLAIMED,
        "phase.started",
    ]
    assert sandbox.denials() == []
