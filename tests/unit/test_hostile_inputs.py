"""Hostile input: a curated list through the real CLI, hostile task messages, property tests.

Every bad request through `drover migrate` must end in a non-zero exit, exactly one line on
stderr, no traceback, nothing in Redis and no libvirt call. Every hostile task message that
reaches a worker must be discarded before task code runs, with a `message.rejected` event.
MigrationSpec either validates into a spec whose fields are safe or raises ValidationError.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import libvirt
import pytest
import redis
import structlog
from celery import Celery
from celery.contrib.testing.worker import start_worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Queue
from pydantic import ValidationError

from cli import main as cli
from config import envelope, events
from config.celery import make_app
from config.settings import load_settings
from jobs.spec import (
    DOMAIN_NAME_PATTERN,
    HOST_NAME_PATTERN,
    MigrationSpec,
    check_address,
    check_migration_uri,
)
from tests.conftest import RedisServer
from tests.support.registry import REGISTRY

JOB_ID = "0123456789ab"


def m(*extra: str, domain: str = "idle-1", src: str = "kvm1", dst: str = "kvm2") -> list[str]:
    """`drover migrate` arguments around `extra` (not --live: add it where a case needs it)."""
    return ["migrate", domain, "--from", src, "--to", dst, *extra]


def live(*extra: str, **kw: str) -> list[str]:
    return m("--live", *extra, **kw)


BAD_DOMAINS = [
    "",
    " ",
    "web 01",
    " web",
    "web ",
    "../etc/passwd",
    "a/b",
    "/abs",
    "web\n01",
    "web\n",
    "web\x00",
    "web\t1",
    "web\r",
    "\x1b[31mred",
    "web\x7f",
    "wéb",
    "ウェブ",
    "web\u200b",
    "web\u202eevil",
    "\uff57\uff45\uff42",  # fullwidth "web"
    "-rf",
    ".hidden",
    "web;id",
    "web$(id)",
    "web`id`",
    "web|cat",
    "web&",
    "web>x",
    "web'",
    'web"',
    "web*",
    "web?",
    "web#1",
    "web%00",
    "web\\x",
    "{web}",
    "[web]",
    "web,db",
    "web=1",
    "a" * 201,
    "a" * 10_000,
    "a" * 1_000_000,
]
BAD_HOSTS = [
    "",
    "kvm9",
    "KVM1",
    "kvm1 ",
    "kvm1\n",
    "../kvm1",
    "kvm1;id",
    "kvm1/x",
    "\uff4b\uff56\uff4d1",  # fullwidth "kvm1"
    "k" * 64,
    "k" * 10_000,
    "-kvm1",
    "kvm1\x00",
]
BAD_MIGRATE_URIS = [
    "qemu+ext:///system?command=/bin/sh",
    "qemu+ssh://h/system?command=x",
    "qemu+tcp://h/system?no_verify=1",
    "qemu+tls://h/system?pkipath=/tmp",
    "tcp://10.0.0.2?command=id",
    "tcp://user@10.0.0.2",
    "tcp://user:pw@10.0.0.2",
    "tcp://10.0.0.2:0",
    "tcp://10.0.0.2:99999",
    "tcp://10.0.0.2:-1",
    "tcp://10.0.0.2:abc",
    "tcp://10.0.0.2:80:90",
    "tcp://10.0.0.2#frag",
    "tcp://10.0.0.2/path",
    "tcp://10.0.0.2/?command=x",
    "unix:///run/../etc/shadow",
    "unix://relative",
    "unix:///run/x;id",
    "unix:///" + "a" * 300,
    "tcp://",
    "ssh://10.0.0.2",
    "http://10.0.0.2",
    "file:///etc/passwd",
    "rdma://h?x=1",
    "tcp://h;id",
    "tcp://h\n",
    "tcp://h ",
    " tcp://h",
    "tcp://[::1",
    "tcp://[zz::1]",
    "TCP://h",
    "tcp:/h",
    "tcp:h",
    "tcp://-oProxyCommand=x",
    "tcp://h%00",
    "tcp://" + "a" * 300,
    # IPv6 scope ids: a plain interface name only
    "tcp://[fe80::1%x y]:4444",
    "tcp://[fe80::1%" + "e" * 5000 + "]:4444",
    "tcp://[fe80::1%eth0;id]",
    "tcp://[fe80::1%eth0\n]",
    "tcp://[fe80::1%\u0435th0]",  # a Cyrillic e
    "tcp://[fe80::1%]",
    "tcp://[fe80::1%eth0%eth1]",
    # ports and addresses in ASCII digits only (`\d` matches every Unicode digit)
    "tcp://h:\u0664\u0669",
    "tcp://h:\uff14\uff19",
    "tcp://\u0661\u0660.0.0.2",
    # brackets hold an IPv6 address only
    "tcp://[10.0.0.1]",
    "tcp://[10.0.0.1]:4444",
    "tcp://[]",
    "tcp://[kvm2]",
]
# Well-formed, but not toward the destination: kvm2 receives at 192.0.2.2 and has no socket
# directory; kvm3 (HOSTILE_EXTRA) receives at 192.0.2.3 and under /run/drover/migrate.
FOREIGN_MIGRATE_URIS = [
    ("kvm2", "tcp://attacker.example:4444"),
    ("kvm2", "tcp://169.254.169.254:80"),
    ("kvm2", "rdma://169.254.169.254"),
    ("kvm2", "tcp://[::ffff:169.254.169.254]:80"),
    ("kvm2", "tcp://192.0.2.1:4444"),  # the source host itself
    ("kvm2", "tcp://192.0.2.2.attacker.example"),
    ("kvm2", "unix:///etc/shadow"),
    ("kvm2", "unix:///run/drover/migrate/m.sock"),
    ("kvm3", "tcp://192.0.2.2"),  # another host's address
    ("kvm3", "unix:///etc/shadow"),
    ("kvm3", "unix:///run/drover/migrate"),
    ("kvm3", "unix:///run/drover/migrate-evil/m.sock"),
    ("kvm3", "unix:////run/drover/migrate/m.sock"),
]
HOSTILE_EXTRA = """
[hosts.kvm3]
peer_uri = "qemu+tcp://192.0.2.3/system"
migration_address = "192.0.2.3"
migration_socket_dir = "/run/drover/migrate"
"""
BAD_LISTEN_ADDRESSES = [
    "10.0.0.1:80",
    "x;rm",
    "a..b",
    "",
    "tcp://h",
    "h/x",
    "h?x",
    "[::1]:80",
    "h\n",
    " h",
    "a" * 254,
    "h_x",
    "*",
    "0.0.0.0/0",
    "-h",
    # written like numbers, no canonical IPv4: the resolver would make another address of each
    "010.213.18.2",  # octal: 8.213.18.2
    "0x0a.0xd5.18.2",
    "181473794",  # 10.209.18.2 as one number
    "1.2.3",
    "999.1.1.1",
]
# The same check guards --tls-destination (with --tls).
BAD_TLS_DESTINATIONS = ["010.0.0.2", "0x0a.0.0.2", "167772162", "kvm2.0x02"]
BAD_NUMBERS = [
    ("--bandwidth", "0"),
    ("--bandwidth", "-1"),
    ("--bandwidth", "1000001"),
    ("--bandwidth", "99999999999999999999999"),
    ("--bandwidth", "lots"),
    ("--bandwidth", "1.5"),
    ("--bandwidth", ""),
    ("--parallel", "0"),
    ("--parallel", "1"),
    ("--parallel", "65"),
    ("--parallel", "-5"),
    ("--parallel", "x"),
    ("--copy-storage", "some"),
    ("--copy-storage", ""),
    ("--copy-storage", "ALL"),
    # Click quotes a bad value back as given: still one line, no escape sequence
    ("--bandwidth", "1\nforged line"),
    ("--parallel", "\x1b]52;c;aGk=\x07"),
]
BAD_COMBINATIONS = [
    live("--p2p", "--direct"),
    live("--direct", "--unmanaged"),
    live("--p2p", "--direct", "--unmanaged"),
    live("--direct", "--tunnelled"),
    live("--unmanaged", "--tunnelled"),
    live("--direct", "--dest-connection"),
    live("--dest-connection", "--migrate-uri", "tcp://10.0.0.2"),
    live("--dest-connection", "--parallel", "2"),
    live("--dest-connection", "--listen-address", "10.0.0.2"),
    live("--dest-connection", "--copy-storage", "all"),
    live("--tunnelled", "--migrate-uri", "tcp://10.0.0.2"),
    live("--tunnelled", "--listen-address", "10.0.0.2"),
    live("--tunnelled", "--postcopy"),
    live("--tunnelled", "--parallel", "2"),
    live("--offline", "--persistent"),
    m("--offline"),
    m("--offline", "--persistent", "--suspend"),
    m("--offline", "--persistent", "--postcopy"),
    m("--offline", "--persistent", "--copy-storage", "all"),
    m("--offline", "--persistent", "--bandwidth", "10"),
    m("--offline", "--persistent", "--tls"),
    m("--offline", "--persistent", "--migrate-uri", "tcp://10.0.0.2"),
    m("--offline", "--persistent", "--tunnelled"),
    m("--postcopy"),
    m("--auto-converge"),
    live("--unmanaged", "--persistent"),
    live("--unmanaged", "--undefine-source"),
    live("--force"),
    live("--force", "--persistent"),
    live("--force", "--dry-run"),
    live(src="kvm1", dst="kvm1"),
    live("--dname", "bad/name"),
    live("--dname", "x" * 300),
]
BAD_ARGV = [
    live("--no-such-flag"),
    live("extra-positional"),
    ["migrate", "idle-1", "--from", "kvm1", "--live"],
    ["migrate", "--from", "kvm1", "--to", "kvm2"],
    ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--bandwidth"],
    ["migrate", "idle-1", "--from"],
    ["--config", "/nonexistent/drover.toml", *live()],
]

# --timeout bounds --wait: finite and above zero only (nan compares false with everything).
BAD_TIMEOUTS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "0", "-0.0"]
BAD_TIMEOUT_COMMANDS = [
    ["migrate", "idle-1", "--from", "kvm1", "--to", "kvm2", "--live", "--wait", "--timeout"],
    ["evacuate", "kvm1", "--wait", "--timeout"],
    ["evacuate", "kvm1", "--dry-run", "--timeout"],
]

BAD_SCHEDULES = [
    ["--at", "9999-12-31T23:59:59-14:00"],  # the year 10000 in UTC
    ["--at", "0001-01-01T00:00:00+14:00"],  # before the year 1 in UTC
    ["--at", "2030-06-01T03:00:00.5Z"],  # the fraction would be dropped: redbeat keeps seconds
    # named ranges that run backwards (Celery would wrap them), names of the other field
    ["--cron", "0 0 * * fri-mon"],
    ["--cron", "0 0 * * sat-sun"],
    ["--cron", "0 0 * * 5-mon"],
    ["--cron", "0 0 1 dec-jan *"],
    ["--cron", "0 0 1 nov-feb/2 *"],
    ["--cron", "0 0 * feb-1 *"],
    ["--cron", "0 0 * * jan"],  # Celery reads it as Monday
    ["--cron", "0 0 * mon *"],
]

# A malformed or unverified Redis URL, from the environment, for any command: refused when the
# settings load, in one line that never shows the password. {password} and {port} are the test
# Redis's own, so a URL is refused for its form, not because nothing answers there.
URL_PASSWORD = "hunter2-never-shown"
BAD_REDIS_URLS = [
    "redis://:{password}@127.0.0.1:abc/0",
    "redis://:{password}@127.0.0.1:99999/0",
    "redis://:{password}@127.0.0.1:0/0",
    "redis://:{password}@127.0.0.1:\u0664\u0669/0",
    "redis://:{password}@[::1",
    "redis://:{password}@[::1]:abc/0",
    "redis://:{password}@[127.0.0.1]:{port}/0",
    "redis://:{password}@/0",
    "redis://:{password}@127.0.0.1:{port}/abc",
    "redis://:{password}@127.0.0.1:{port}/0?socket_timeout=abc",
    "redis://:{password}@127.0.0.1:{port}/0?connection_class=x",
    "redis://:{password}@127.0.0.1:{port}/0?password=" + URL_PASSWORD,
    "redis://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=bogus",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=none",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=CERT_NONE",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=optional",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=CERT_OPTIONAL",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs=../ca.pem",
    "rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_cert_reqs=none",
    "redis://:{password}/x@127.0.0.1:{port}/0",  # a raw '/' in the password
    "redis://:{password}?x@127.0.0.1:{port}/0",
    "redis://:{password} @127.0.0.1:{port}/0",
    "redis://:{password}@127.0.0.1:{port}/0\n",
    "redis://:{password}@127.0.0.1:{port}/0#frag",
    "http://:{password}@127.0.0.1:{port}/0",
    "{password}@127.0.0.1:{port}",
]
REDIS_URL_COMMANDS = [live(), ["jobs"], ["hosts"], ["schedule", "list"], ["job", JOB_ID]]

# `drover host disable kvm1 --reason R`: printable text on one line, at most 200 characters.
BAD_REASONS = [
    "\x1b]52;c;ZWNobyBvd25lZA==\x07",  # OSC 52: sets the terminal's clipboard
    "\x1b]52;c;ZWNobyBvd25lZA==\x1b\\",  # the same, ended by ST
    "\x1b[2J\x1b[Hall clear",
    "\x1b[31mred",
    "\x9b31mred",  # a C1 CSI
    "fine\nkvm2 disabled since 2030-01-01 (forged)",
    "line\r",
    "tab\there",
    "nul\x00",
    "del\x7f",
    "bell\x07",
    "\u202eevil",  # right-to-left override
    "zero\u200bwidth",
    "nbsp\u00a0",
    "",
    "   ",
    "r" * 201,
    "r" * 100_000,
]

# Ids and names an operator passes to the commands that act on one job, schedule or host.
BAD_IDS = ["../../etc/passwd", "0123456789ab\n", "\x1b[31mred", "", "x" * 10_000, "*"]
ID_COMMANDS = [["abort"], ["postcopy"], ["events"], ["schedule", "remove"]]

_CASES: list[tuple[str, list[str]]] = [
    *((f"{' '.join(c)} {i[:20]!r}", [*c, i]) for c in ID_COMMANDS for i in BAD_IDS),
    *((f"host enable {h[:20]!r}", ["host", "enable", h]) for h in BAD_HOSTS),
    *((f"domain {d[:20]!r}", live(domain=d)) for d in BAD_DOMAINS),
    *((f"--from {h[:20]!r}", live(src=h)) for h in BAD_HOSTS),
    *((f"--to {h[:20]!r}", live(dst=h)) for h in BAD_HOSTS),
    *((f"--migrate-uri {u[:30]!r}", live("--migrate-uri", u)) for u in BAD_MIGRATE_URIS),
    *(
        (f"--migrate-uri {u[:30]!r} --to {h}", live("--migrate-uri", u, dst=h))
        for h, u in FOREIGN_MIGRATE_URIS
    ),
    *((f"--listen-address {a[:20]!r}", live("--listen-address", a)) for a in BAD_LISTEN_ADDRESSES),
    *(
        (f"--tls-destination {a!r}", live("--tls", "--tls-destination", a))
        for a in BAD_TLS_DESTINATIONS
    ),
    *((f"{opt} {v[:20]!r}", live(opt, v)) for opt, v in BAD_NUMBERS),
    *((f"flags {' '.join(a[6:])[:60]}", a) for a in BAD_COMBINATIONS),
    *((f"argv {' '.join(a)[:60]}", a) for a in BAD_ARGV),
    *(
        (f"schedule {' '.join(a)[:60]}", ["schedule", "add", "evacuate", "kvm1", *a])
        for a in BAD_SCHEDULES
    ),
    *(
        (
            f"host disable --reason {r[:30]!r} ({len(r)} chars)",
            ["host", "disable", "kvm1", "--reason", r],
        )
        for r in BAD_REASONS
    ),
    *(
        (f"{c[0]} {c[-2]} --timeout {t}", [*c, t])
        for c in BAD_TIMEOUT_COMMANDS
        for t in BAD_TIMEOUTS
    ),
]
_ENV_CASES: list[tuple[str, list[str], dict[str, str]]] = [
    *(
        (
            f"DROVER_REDIS_URL {u.replace('{password}', 'PW').replace('{port}', 'PORT')[:60]!r}",
            live(),
            {"DROVER_REDIS_URL": u},
        )
        for u in BAD_REDIS_URLS
    ),
    *(
        (
            f"DROVER_REDIS_URL port abc: {' '.join(a)[:30]}",
            a,
            {"DROVER_REDIS_URL": BAD_REDIS_URLS[0]},
        )
        for a in REDIS_URL_COMMANDS[1:]
    ),
]
CASES = [
    (f"{i:03d} {name}", argv, env)
    for i, (name, argv, env) in enumerate(
        [*((name, argv, {}) for name, argv in _CASES), *_ENV_CASES]
    )
]
# exit code, one stderr line, no traceback, no stdout, no password, no Redis, no libvirt
OUTCOMES_PER_CASE = 7


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, redis_srv: RedisServer) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "drover.toml"
    path.write_text(REGISTRY.format(url=redis_srv.url) + HOSTILE_EXTRA)
    return path


@pytest.fixture
def no_libvirt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record any attempt to open a libvirt connection (none may happen)."""
    calls: list[str] = []
    for name in ("open", "openAuth", "openReadOnly"):
        monkeypatch.setattr(libvirt, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The real entry point (`python -m cli`), in process, output captured."""
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["drover", *argv]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old_argv
    return int(code or 0), out.getvalue(), err.getvalue()


# Every command that changes what drover does: each must meet hostile input below.
CHANGING_COMMANDS = [
    ("migrate",),
    ("abort",),
    ("postcopy",),
    ("evacuate",),
    ("host", "disable"),
    ("host", "enable"),
    ("schedule", "add", "evacuate"),
    ("schedule", "remove"),
]


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        yield prefix
        return
    for name, sub in subcommands.items():
        yield from _command_paths(sub, (*prefix, name))


def test_every_command_that_changes_state_meets_hostile_input() -> None:
    """A new or renamed command that acts on jobs, hosts or schedules is attacked too."""
    from typer.main import get_command

    commands = set(_command_paths(get_command(cli.app)))
    assert set(CHANGING_COMMANDS) <= commands, set(CHANGING_COMMANDS) - commands
    attacked = {tuple(argv[: len(c)]) for _, argv, _ in CASES for c in CHANGING_COMMANDS}
    assert [c for c in CHANGING_COMMANDS if c not in attacked] == []
    assert len({name for name, _, _ in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize(("name", "argv", "env"), CASES, ids=[name for name, _, _ in CASES])
def test_hostile_cli_input_is_refused_cleanly(
    name: str,
    argv: list[str],
    env: dict[str, str],
    registry: Path,
    redis_srv: RedisServer,
    no_libvirt: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DROVER_CONFIG", str(registry))
    monkeypatch.delenv("DROVER_REDIS_URL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(password=redis_srv.password, port=redis_srv.port))
    r = redis.Redis.from_url(redis_srv.url)
    r.flushdb()
    code, out, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert code != 0, (name, out, err)
    assert len(lines) == 1 and lines[0].strip(), (name, err[:500])
    assert "Traceback" not in out + err
    assert out == ""
    assert URL_PASSWORD not in err and redis_srv.password not in err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", err), err[:200]
    assert r.keys("*") == [], name
    assert no_libvirt == []


@pytest.mark.parametrize(
    "argv",
    [
        live(domain="web\n01"),
        live("--migrate-uri", "qemu+ext:///system?command=/bin/sh"),
        live("--p2p", "--direct"),
        live(src="kvm9"),
    ],
)
def test_a_sample_through_a_real_subprocess(
    argv: list[str], registry: Path, redis_srv: RedisServer
) -> None:
    """The in-process harness above behaves like the installed command."""
    from tests.unit.test_cli_errors import drover

    result = drover(registry, *argv)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not redis.Redis.from_url(redis_srv.url).keys("drover:*")


# ---- hostile task messages at a worker -------------------------------------------------------


class Probe:
    """A worker on a private queue with one drover-style task that records what it ran."""

    def __init__(self, app: Celery, queue: str, log: io.StringIO) -> None:
        self.app, self.queue, self.log = app, queue, log
        self.ran: list[Any] = []
        self.lock = threading.Lock()

    def publish(self, body: Any, *, headers: dict[str, Any] | None = None, **how: Any) -> str:
        message_id = str(uuid.uuid4())
        hdrs = {"task": "drover.test_probe", "id": message_id, "lang": "py"}
        if headers is not None:
            hdrs = {**headers, "id": message_id}
        exchange = Exchange(self.queue, "direct")
        with Connection(self.app.conf.broker_url) as conn:
            conn.Producer().publish(
                body,
                exchange=exchange,
                routing_key=self.queue,
                headers=hdrs,
                declare=[Queue(self.queue, exchange, routing_key=self.queue)],
                **how,
            )
        return message_id

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line]


@pytest.fixture(scope="module")
def probe(registry: Path) -> Iterator[Probe]:
    mp = pytest.MonkeyPatch()
    mp.setenv("DROVER_CONFIG", str(registry))
    old = structlog.get_config()
    log = io.StringIO()
    events.configure("test-worker", None, stream=log)
    app = make_app(load_settings(registry))
    queue = f"drover.test.{uuid.uuid4().hex[:8]}"
    app.conf.update(include=[], task_default_queue=queue, worker_send_task_events=False)
    p = Probe(app, queue, log)

    @app.task(name="drover.test_probe")
    def test_probe(job_id: str) -> None:
        with p.lock:
            p.ran.append(job_id)

    try:
        with start_worker(
            app, pool="threads", perform_ping_check=False, concurrency=2, hostname=PROBE_NODE
        ):
            yield p
    finally:
        structlog.configure(**old)
        mp.undo()


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
BIG = "x" * 70_000
PROBE_HOST = "probe-host"
PROBE_NODE = f"drover@{PROBE_HOST}"
PROBE_TASK = "drover.test_probe"
MESSAGE_TTL_S = 900.0


def sealed(job_id: str, **change: Any) -> dict[str, Any]:
    """The kwargs of a message as drover's publisher stamps them (config/envelope.py)."""
    env = envelope.stamp(PROBE_TASK, PROBE_HOST, job_id, time.time(), MESSAGE_TTL_S)
    return {envelope.ENVELOPE_KEY: {**env, **change}}


# (name, body, publish options, the reason logged)
HOSTILE_MESSAGES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("pickle", [[JOB_ID], {}, EMBED], {"serializer": "pickle"}, "ContentDisallowed"),
    (
        "yaml content type",
        b"- [0123456789ab]\n",
        {"content_type": "application/x-yaml", "content_encoding": "utf-8"},
        "ContentDisallowed",
    ),
    ("oversized", [[BIG], {}, EMBED], {"serializer": "json"}, "exceeds 65536"),
    ("keyword arguments", [[JOB_ID], {"force": True}, EMBED], {"serializer": "json"}, "keyword"),
    ("no envelope", [[JOB_ID], {}, EMBED], {"serializer": "json"}, "no envelope"),
    (
        "envelope of another task (header swap)",
        [[JOB_ID], sealed(JOB_ID, task="drover.source_preflight"), EMBED],
        {"serializer": "json"},
        "delivered as",
    ),
    (
        "envelope for another host's queue",
        [[JOB_ID], sealed(JOB_ID, host="kvm2"), EMBED],
        {"serializer": "json"},
        "delivered to",
    ),
    (
        "envelope of another job",
        [[JOB_ID], sealed("fedcba987654"), EMBED],
        {"serializer": "json"},
        "another job",
    ),
    (
        "expired envelope",
        [[JOB_ID], sealed(JOB_ID, exp=time.time() - 5), EMBED],
        {"serializer": "json"},
        "expired",
    ),
    (
        "envelope valid for a year",
        [[JOB_ID], sealed(JOB_ID, exp=time.time() + 365 * 86_400), EMBED],
        {"serializer": "json"},
        "further away",
    ),
    (
        "envelope with NaN expiry",
        [[JOB_ID], sealed(JOB_ID, exp=float("nan")), EMBED],
        {"serializer": "json"},
        "expiry",
    ),
    (
        "envelope with a short nonce",
        [[JOB_ID], sealed(JOB_ID, nonce="00"), EMBED],
        {"serializer": "json"},
        "nonce",
    ),
    (
        "envelope with an extra field",
        [[JOB_ID], {"envelope": {**sealed(JOB_ID)["envelope"], "x": 1}}, EMBED],
        {"serializer": "json"},
        "no valid envelope",
    ),
    (
        "celery built-in (celery.accumulate)",
        [[JOB_ID], sealed(JOB_ID, task="celery.accumulate"), EMBED],
        {"serializer": "json", "headers": {"task": "celery.accumulate", "lang": "py"}},
        "not a drover task",
    ),
    ("no argument", [[], {}, EMBED], {"serializer": "json"}, "not exactly one argument"),
    ("two arguments", [[JOB_ID, JOB_ID], {}, EMBED], {"serializer": "json"}, "not exactly one"),
    ("number", [[123456789012], {}, EMBED], {"serializer": "json"}, "not a job id"),
    ("path", [["../../etc/pw"], {}, EMBED], {"serializer": "json"}, "not a job id"),
    ("upper case id", [["0123456789AB"], {}, EMBED], {"serializer": "json"}, "not a job id"),
    ("id with newline", [[JOB_ID + "\n"], {}, EMBED], {"serializer": "json"}, "not a job id"),
    ("object as argument", [[{"id": JOB_ID}], {}, EMBED], {"serializer": "json"}, "not a job"),
    (
        "broken json",
        b'[["0123456789ab"], {',
        {"content_type": "application/json", "content_encoding": "utf-8"},
        "DecodeError",
    ),
    ("body an object", {"job": JOB_ID}, {"serializer": "json"}, "ValueError"),
    ("body a string", JOB_ID, {"serializer": "json"}, "ValueError"),
    ("body null", None, {"serializer": "json"}, "TypeError"),
]


def _wait(cond: Any, what: str, timeout: float = 20.0) -> None:
    from tests.support.lab_fixtures import wait_for

    wait_for(cond, timeout, what)


def test_a_well_formed_message_runs(probe: Probe) -> None:
    probe.publish([[JOB_ID], sealed(JOB_ID), EMBED], serializer="json")
    _wait(lambda: JOB_ID in probe.ran, "the probe task to run")


def test_control_messages_are_not_obeyed(probe: Probe) -> None:
    """On a Redis that lets anyone publish control (no ACL here), a worker answers no ping
    and ignores shutdown: remote control is off (config/celery.py)."""
    assert probe.app.control.ping(destination=[PROBE_NODE], timeout=1.0) == []
    probe.app.control.broadcast("shutdown", destination=[PROBE_NODE])
    probe.app.control.broadcast("add_consumer", arguments={"queue": "drover.host.kvm2"})
    job_id = "0c0c0c0c0c0c"
    probe.publish([[job_id], sealed(job_id), EMBED], serializer="json")
    _wait(lambda: job_id in probe.ran, "the worker to run a task after the shutdown order")


def test_a_replayed_message_runs_once(probe: Probe) -> None:
    job_id = "0a0b0c0d0e0f"
    body = [[job_id], sealed(job_id), EMBED]
    probe.publish(body, serializer="json")
    _wait(lambda: job_id in probe.ran, "the first delivery to run")
    replay = probe.publish(body, serializer="json")
    _wait(
        lambda: any(
            e.get("event") == "message.rejected" and replay in str(e.get("message_id"))
            for e in probe.events()
        ),
        "the replay to be rejected",
    )
    assert "replayed" in next(
        e["reason"] for e in probe.events() if replay in str(e.get("message_id"))
    )
    assert probe.ran.count(job_id) == 1


@pytest.mark.parametrize(
    ("name", "body", "how", "reason"), HOSTILE_MESSAGES, ids=[c[0] for c in HOSTILE_MESSAGES]
)
def test_hostile_message_is_rejected_before_the_task_runs(
    probe: Probe, name: str, body: Any, how: dict[str, Any], reason: str
) -> None:
    before = list(probe.ran)
    message_id = probe.publish(body, **how)

    def rejected() -> list[dict[str, Any]]:
        return [
            e
            for e in probe.events()
            if e.get("event") == "message.rejected" and message_id in str(e.get("message_id"))
        ]

    _wait(lambda: bool(rejected()), f"the {name} message to be rejected")
    event = rejected()[0]
    assert reason in event["reason"], event
    assert BIG not in json.dumps(event)  # the event carries an excerpt, never the whole body
    # A good message published after it runs, and it is the only new run.
    probe.publish([["fedcba987654"], sealed("fedcba987654"), EMBED], serializer="json")
    _wait(lambda: "fedcba987654" in probe.ran[len(before) :], "the next good message")
    assert probe.ran[len(before) :] == ["fedcba987654"]
    probe.ran.remove("fedcba987654")


def test_protocol_1_message_with_keyword_arguments_is_rejected(probe: Probe) -> None:
    before = list(probe.ran)
    body = {"task": "drover.test_probe", "id": "p1", "args": [JOB_ID], "kwargs": {"x": 1}}
    message_id = probe.publish(body, headers={}, serializer="json")
    _wait(
        lambda: any(
            e.get("event") == "message.rejected" and "keyword" in e.get("reason", "")
            for e in probe.events()
        ),
        f"the protocol-1 message {message_id} to be rejected",
    )
    assert probe.ran == before


def test_task_called_directly_checks_its_arguments_too(probe: Probe) -> None:
    from celery.exceptions import Reject

    task = probe.app.tasks["drover.test_probe"]
    with pytest.raises(Reject):
        task("not-a-job-id")
    with pytest.raises(Reject):
        task(JOB_ID, extra=1)


# ---- property tests over the spec -----------------------------------------------------------

_DOMAIN = re.compile(DOMAIN_NAME_PATTERN.replace("$", r"\Z"))
_HOST = re.compile(HOST_NAME_PATTERN.replace("$", r"\Z"))
_UNSAFE = re.compile(r"[\x00-\x20\x7f?#;&|`$'\"\\<>]")

text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["idle-1", "kvm1", "kvm2", "tcp://10.0.0.2:4000", "10.0.0.2", "unix:///run/m.sock", "web\n"]
)
request = st.fixed_dictionaries(
    {"domain": text, "src": text, "dst": text},
    optional={
        "live": st.booleans(),
        "offline": st.booleans(),
        "persistent": st.booleans(),
        "control": st.sampled_from(["p2p", "direct", "unmanaged", "x"]),
        "transport": st.sampled_from(["native", "tunnelled", "pipe"]),
        "dest_connection": st.booleans(),
        "postcopy": st.booleans(),
        "dname": text | st.none(),
        "bandwidth_mib": st.integers(-5, 2_000_000) | st.none(),
        "parallel": st.integers(-5, 100) | st.none(),
        "copy_storage": st.sampled_from(["all", "inc", "some", None]),
        "migrate_uri": text | st.none(),
        "listen_address": text | st.none(),
        "command": text,  # unknown fields must be refused
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request)
def test_spec_is_safe_or_a_validation_error(raw: dict[str, Any]) -> None:
    try:
        spec = MigrationSpec.model_validate(raw)
    except ValidationError:
        return
    assert "command" not in raw
    for name in (spec.domain, spec.dname or spec.domain):
        assert _DOMAIN.match(name) and name != ".." and "/" not in name
    assert _HOST.match(spec.src) and _HOST.match(spec.dst) and spec.src != spec.dst
    for value in (spec.migrate_uri, spec.listen_address):
        assert value is None or not _UNSAFE.search(value)
    if spec.migrate_uri is not None:
        assert check_migration_uri(spec.migrate_uri) == spec.migrate_uri
        assert "?" not in spec.migrate_uri and "@" not in spec.migrate_uri
    assert spec.bandwidth_mib is None or 1 <= spec.bandwidth_mib <= 1_000_000
    assert spec.parallel is None or 2 <= spec.parallel <= 64


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_migrate_uri_is_strict_or_refused(uri: str) -> None:
    try:
        spec = MigrationSpec.model_validate(
            {"domain": "d", "src": "a", "dst": "b", "migrate_uri": uri}
        )
    except ValidationError:
        return
    assert spec.migrate_uri is not None
    assert re.fullmatch(STRICT_MIGRATE_URI, uri)


STRICT_MIGRATE_URI = (
    r"(tcp|rdma)://(\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]{1,15})?\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?"
    r"|unix:///[A-Za-z0-9._/-]+"
)


@pytest.mark.parametrize(
    "uri", ["tcp://[fe80::1%eth0]:4444", "rdma://[fd00::2]", "tcp://10.0.0.2:49152/"]
)
def test_the_strict_uri_form_admits_what_the_spec_accepts(uri: str) -> None:
    """The property above would be vacuous if its pattern refused the accepted forms."""
    assert check_migration_uri(uri) == uri
    assert re.fullmatch(STRICT_MIGRATE_URI, uri)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=40)
    | st.builds(lambda a, s: f"{a}%{s}", st.sampled_from(["fe80::1", "::1", "10.0.0.1"]), st.text())
)
def test_any_address_is_plain_ascii_or_refused(value: str) -> None:
    try:
        check_address(value)
    except ValueError:
        return
    assert re.fullmatch(r"\[?[A-Za-z0-9.:-]+(%[A-Za-z0-9_.-]{1,15})?\]?", value, re.ASCII), value


NUMERIC_LOOKING = ["010.213.18.2", "0x0a.0xd5.18.2", "181473794", "1.2.3", "999.1.1.1", "0x0a.b"]


@pytest.mark.parametrize("value", NUMERIC_LOOKING)
def test_a_name_written_like_a_number_must_be_a_canonical_ipv4_address(value: str) -> None:
    """RFC 3696: a top-level label is never all-numeric; the C resolver reads these as other
    addresses (010.213.18.2 is 8.213.18.2), so they are refused, not passed on."""
    with pytest.raises(ValueError, match="is written like a number") as exc:
        check_address(value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "value",
    ["10.0.0.1", "192.0.2.2", "::1", "fe80::1%eth0", "[fe80::1]", "kvm2.example", "3com.example"],
)
def test_canonical_addresses_and_names_still_pass(value: str) -> None:
    assert check_address(value) == value
