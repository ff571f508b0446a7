"""Redis ACL users, one per drover role: the keys, channels and commands each role needs.

Why: with one shared password, every process that reaches Redis can do anything there: read
and rewrite every job, consume another host's task messages, flush the database, reconfigure
or shut down the server. Signed messages (docs/security.md) stop forged *tasks*, not the
rest. So each role gets a Redis user of its own, holding what its code paths use and no
more, read off drover's key layout (jobs/, producer/schedules.py) and off kombu's Redis
transport (kombu/transport/redis.py):

- a queue is a list named after it (`drover.host.kvm1`, plus `<queue>\\x06\\x16<priority>`
  lists when priorities are used), filled with LPUSH, consumed with BRPOP;
- a binding is a member of the set `_kombu.binding.<exchange>` (SADD when a queue is
  declared, SMEMBERS to route a message, SREM when an auto-delete queue goes); since kombu
  5.7 a queue without x-expires also marks its binding in `_kombu.binding_permanent.<exchange>`,
  and a queue with x-expires (an event receiver's, a pidbox's) keeps its binding alive by a
  Lua script that stamps a deadline in `_kombu.binding_deadlines` (TIME, ZADD), where a
  sweep of the same consumers drops overdue tables (ZRANGEBYSCORE, EXISTS, DEL, ZREM);
- a fanout exchange (Celery's events `celeryev`, remote control's `celery.pidbox`) is a
  pub/sub channel `/<db>.<exchange>[/<routing key>]`, PUBLISHed to and PSUBSCRIBEd;
- a consumer that acknowledges keeps its in-flight messages in `unacked` and
  `unacked_index` and restores stale ones under the lock `unacked_mutex` (a Lua release);
- Celery's remote control (pidbox) answers on the direct exchange `reply.celery.pidbox`,
  one list `<ticket>.reply.celery.pidbox` per request.

Redis checks a PSUBSCRIBE pattern literally against the user's channel patterns, so the
event receiver's `/<db>.celeryev/*` and the worker's `/<db>.celery.pidbox` are listed exactly
as kombu subscribes them. Lua scripts (jobs/store.py, jobs/admission.py, redis-py's locks)
run with the caller's permissions, so EVAL/EVALSHA and SCRIPT LOAD add no keys.

docs/redis-acl.md explains every rule; `drover redis-acl` renders the file Redis loads.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from config.celery import QUEUE_PREFIX, celery_config
from config.settings import ConfigError, Settings
from jobs.store import KEY_PREFIX as JOBS_KEY_PREFIX
from producer.schedules import KEY_PREFIX as SCHEDULE_KEY_PREFIX

WORKER, PRODUCER, FLOWER, BEAT = "worker", "producer", "flower", "beat"
ROLES = (WORKER, PRODUCER, FLOWER, BEAT)
USER_PREFIX = "drover-"
# Only PING: a container health check or a readiness probe, with no password to hide.
HEALTH_USER = f"{USER_PREFIX}health"
# Passwords go into redis:// URLs as they are, so only URL-unreserved characters.
MIN_PASSWORD_CHARS = 16
MAX_PASSWORD_CHARS = 256
_PASSWORD = re.compile(r"^[A-Za-z0-9._~-]+\Z")
PASSWORD_ENV = "DROVER_REDIS_{}_PASSWORD"
# A second accepted password of a role while it is being rotated (docs/redis-acl.md).
PREVIOUS_PASSWORD_ENV = "DROVER_REDIS_{}_PASSWORD_PREVIOUS"
MAX_DB = 15  # Redis's default `databases 16`
PRIVATE_FILE_MODE = 0o600

# kombu's Redis transport (kombu/transport/redis.py: keyprefix_queue, the unacked_* keys).
BINDING_PREFIX = "_kombu.binding."
# kombu 5.7: bindings of queues without x-expires (keyprefix_binding_permanent), and the
# deadlines of expiring queues' binding tables (keyprefix_binding_deadlines).
PERMANENT_BINDING_PREFIX = "_kombu.binding_permanent."
BINDING_DEADLINES = "_kombu.binding_deadlines"
# What an expiring queue's consumer runs to keep its binding (kombu's REFRESH_BINDING and
# SWEEP_BINDINGS scripts): Lua runs with the caller's permissions.
BINDING_EXPIRY_COMMANDS = ("+time", "+zadd", "+zrangebyscore", "+zrem", "+exists", "+del")
UNACKED_KEYS = ("unacked", "unacked_index", "unacked_mutex")
# Transport options that would move kombu's keys or channels away from the names above.
_UNSUPPORTED_TRANSPORT_OPTIONS = ("global_keyprefix", "fanout_prefix", "fanout_patterns")

Access = Literal["RW", "R", "W"]
_KEY_RULE = {"RW": "~", "R": "%R~", "W": "%W~"}

# Every role starts from nothing; data roles then take whole categories, minus these.
BASE_COMMANDS = ("-@all", "+@connection")
# After the categories: admin and key-enumerating commands no role uses. @read holds SCAN
# and RANDOMKEY (key names outside the role's patterns), @write holds FUNCTION LOAD/FLUSH.
DENIED_COMMANDS = ("-@dangerous", "-scan", "-randomkey", "-function")
SCRIPT_COMMANDS = ("+eval", "+evalsha", "+script|load", "+script|exists")


@dataclass(frozen=True)
class KeyPattern:
    pattern: str
    access: Access
    why: str


@dataclass(frozen=True)
class ChannelPattern:
    pattern: str
    why: str

    def rule(self) -> str:
        return f"&{self.pattern}"


@dataclass(frozen=True)
class Grant:
    """One thing a role does in Redis: the keys, channels and commands it takes."""

    name: str
    why: str
    keys: tuple[KeyPattern, ...] = ()
    channels: tuple[ChannelPattern, ...] = ()
    categories: tuple[str, ...] = ()  # "+@read": before DENIED_COMMANDS
    commands: tuple[str, ...] = ()  # "+publish": after them
    # The data commands it uses, listed for a role without data categories (Flower): a
    # role holding @read and @write has them already.
    data_commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    name: str
    why: str
    grants: tuple[Grant, ...]

    @property
    def user(self) -> str:
        return f"{USER_PREFIX}{self.name}"

    def key_rules(self) -> list[str]:
        """One rule per pattern: a pattern two grants read and write is RW once."""
        access: dict[str, set[str]] = {}
        for key in (k for g in self.grants for k in g.keys):
            access.setdefault(key.pattern, set()).update(key.access)
        return [f"{_KEY_RULE[''.join(sorted(a))]}{p}" for p, a in access.items()]

    def channel_rules(self) -> list[str]:
        return _unique(c.rule() for g in self.grants for c in g.channels)

    def command_rules(self) -> list[str]:
        categories = _unique(c for g in self.grants for c in g.categories)
        commands = [c for g in self.grants for c in g.commands]
        if not categories:
            commands += [c for g in self.grants for c in g.data_commands]
        denied = DENIED_COMMANDS if categories else DENIED_COMMANDS[:1]
        return [*BASE_COMMANDS, *categories, *denied, *_unique(commands)]

    def rules(self) -> list[str]:
        """Everything after the password: `resetkeys` and `resetchannels` first, so that a
        line applied to an existing user (ACL SETUSER) leaves nothing of the old rules."""
        return [
            "resetkeys",
            "resetchannels",
            *self.key_rules(),
            *self.channel_rules(),
            *self.command_rules(),
        ]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class BrokerNames:
    """The names drover, Celery and kombu use in one Redis database."""

    db: int = 0
    # Whether workers serve remote control (`worker_enable_remote_control`; off in drover).
    remote_control: bool = False
    host_queue_prefix: str = QUEUE_PREFIX
    default_queue: str = "drover.default"
    event_exchange: str = "celeryev"
    event_queue_prefix: str = "celeryev"
    control_exchange: str = "celery"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, db: int | None = None, remote_control: bool | None = None
    ) -> BrokerNames:
        """The names as the fleet's Celery configuration makes them (ConfigError, one line)."""
        from celery import Celery

        app = Celery("drover-acl", set_as_current=False)
        app.conf.update(celery_config(settings))
        options = app.conf.broker_transport_options or {}
        unsupported = [o for o in _UNSUPPORTED_TRANSPORT_OPTIONS if o in options]
        if unsupported:
            raise ConfigError(
                f"broker transport option {unsupported[0]} moves kombu's keys; "
                "the Redis ACL does not follow it"
            )
        return cls(
            db=redis_db(settings.redis_url) if db is None else db,
            remote_control=(
                bool(app.conf.worker_enable_remote_control)
                if remote_control is None
                else remote_control
            ),
            default_queue=str(app.conf.task_default_queue),
            event_exchange=str(app.conf.event_exchange),
            event_queue_prefix=str(app.conf.event_queue_prefix),
            control_exchange=str(app.conf.control_exchange),
        )

    @property
    def fanout(self) -> str:
        """kombu's prefix of every pub/sub channel: `/{db}.` (keyprefix_fanout)."""
        return f"/{self.db}."

    @property
    def pidbox(self) -> str:
        return f"{self.control_exchange}.pidbox"

    @property
    def reply_pidbox(self) -> str:
        return f"reply.{self.control_exchange}.pidbox"


def redis_db(url: str) -> int:
    """The database number of a redis:// URL (0 when it names none)."""
    path = urlsplit(url).path.strip("/")
    if not path:
        return 0
    if not path.isdigit() or int(path) > MAX_DB:
        raise ConfigError(f"redis_url: database {path!r} is not a number from 0 to {MAX_DB}")
    return int(path)


def grants(names: BrokerNames) -> dict[str, Grant]:
    """Every grant, by name; `roles` picks from these."""
    n = names
    queues = f"{n.host_queue_prefix}*"
    data = ("+@read", "+@write", "+@transaction")
    return {
        "jobs": Grant(
            "jobs",
            "job and evacuation records, their transitions, phases and event streams, domain "
            "leases, concurrency slots, memory reservations, maintenance marks, worker "
            "heartbeats and host reports, schedule entries",
            keys=(KeyPattern(f"{JOBS_KEY_PREFIX}:*", "RW", "everything drover keeps"),),
            categories=data,
        ),
        "schedules": Grant(
            "schedules",
            "celery-redbeat's entries, their index and statics, and the beat's lock",
            keys=(
                KeyPattern(
                    f"{SCHEDULE_KEY_PREFIX}*",
                    "RW",
                    "redbeat_key_prefix (producer/schedules.py); the lock is under it too",
                ),
            ),
            categories=data,
        ),
        "scripts": Grant(
            "scripts",
            "compare-and-set transitions, admission, leases, reservations and redis-py's "
            "locks are Lua scripts: EVALSHA, SCRIPT LOAD when Redis lost them, EVAL",
            commands=SCRIPT_COMMANDS,
        ),
        "publish-tasks": Grant(
            "publish-tasks",
            "send phase tasks to host queues: declare the queue, route, LPUSH",
            keys=(
                KeyPattern(queues, "W", "LPUSH onto a host's queue, never read it"),
                KeyPattern(
                    f"{BINDING_PREFIX}{queues}",
                    "RW",
                    "the queue's binding: SADD when declared, SMEMBERS to route",
                ),
                KeyPattern(
                    f"{PERMANENT_BINDING_PREFIX}{queues}",
                    "RW",
                    "the same binding marked permanent (no x-expires): SADD when declared",
                ),
            ),
            data_commands=("+lpush", "+sadd", "+smembers"),
        ),
        "consume-tasks": Grant(
            "consume-tasks",
            "take phase tasks off the host's queue and acknowledge them",
            keys=(
                KeyPattern(queues, "RW", "BRPOP from the host's queue"),
                *(
                    KeyPattern(key, "RW", "kombu's ack emulation and its restore lock")
                    for key in UNACKED_KEYS
                ),
            ),
            data_commands=("+brpop", "+zadd", "+hset", "+hdel", "+zrem", "+zrevrangebyscore"),
        ),
        "send-events": Grant(
            "send-events",
            "Celery events (task-sent, task-started, worker-heartbeat, ...) for Flower",
            channels=(
                ChannelPattern(
                    f"{n.fanout}{n.event_exchange}/*",
                    "PUBLISH /<db>.celeryev/<event type>",
                ),
            ),
            commands=("+publish",),
        ),
        "receive-events": Grant(
            "receive-events",
            "an event receiver: bind a queue to celeryev, PSUBSCRIBE, clean up on exit",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.event_exchange}",
                    "RW",
                    "the receiver's binding: SADD (by kombu's refresh script), SREM when it "
                    "leaves, DEL by a sweep once overdue",
                ),
                *_binding_expiry_keys(n.event_exchange),
                KeyPattern(
                    f"{n.event_queue_prefix}.*",
                    "W",
                    "DEL of the receiver's (never filled) auto-delete queue when it leaves",
                ),
            ),
            channels=(
                ChannelPattern(
                    f"{n.fanout}{n.event_exchange}/*",
                    "PSUBSCRIBE of exactly this pattern (routing key #)",
                ),
            ),
            commands=("+psubscribe", "+punsubscribe", "+unsubscribe", *SCRIPT_COMMANDS),
            data_commands=(
                "+sadd",
                "+srem",
                "+del",
                "+multi",
                "+exec",
                "+discard",
                *BINDING_EXPIRY_COMMANDS,
            ),
        ),
        "queue-lengths": Grant(
            "queue-lengths",
            "Flower's Broker page and /api/queues/length: LLEN of every queue it knows",
            keys=(
                KeyPattern(queues, "R", "LLEN of each host queue and its priority lists"),
                KeyPattern(f"{n.default_queue}*", "R", "LLEN of Celery's default queue"),
            ),
            data_commands=("+llen", "+multi", "+exec", "+discard"),
        ),
        "send-control": Grant(
            "send-control",
            "Celery remote control requests (inspect, ping): PUBLISH to the pidbox, then "
            "wait for the replies on a reply queue of its own",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.reply_pidbox}",
                    "RW",
                    "the reply queue's binding: SADD, SREM when it goes",
                ),
                *_binding_expiry_keys(n.reply_pidbox),
                KeyPattern(
                    f"*.{n.reply_pidbox}*",
                    "RW",
                    "its own reply queue <ticket>.reply.celery.pidbox (and its priority "
                    "lists): purged first, BRPOP of the replies, DEL when it goes",
                ),
                *(
                    KeyPattern(
                        key,
                        "RW",
                        "kombu has every consumer, a reply consumer too, put back messages "
                        "a dead consumer left unacknowledged (under the unacked_mutex lock)",
                    )
                    for key in UNACKED_KEYS
                ),
            ),
            channels=(ChannelPattern(f"{n.fanout}{n.pidbox}", "PUBLISH of a broadcast request"),),
            commands=("+publish", *SCRIPT_COMMANDS),
            data_commands=(
                # the reply queue: bound, purged, read, removed
                "+sadd",
                "+srem",
                "+llen",
                "+brpop",
                "+del",
                # the restore: the lock (SET NX, a Lua GET and DEL to release), the stale
                # tags, the transaction putting them back
                "+set",
                "+get",
                "+zrevrangebyscore",
                "+hget",
                "+zrem",
                "+hdel",
                "+watch",
                "+unwatch",
                "+multi",
                "+exec",
                "+discard",
                *BINDING_EXPIRY_COMMANDS,
            ),
        ),
        "serve-control": Grant(
            "serve-control",
            "a worker's pidbox: PSUBSCRIBE to the broadcast channel, reply to each request",
            keys=(
                KeyPattern(
                    f"{BINDING_PREFIX}{n.pidbox}",
                    "RW",
                    "the worker's pidbox binding: SADD, SREM when it stops",
                ),
                *_binding_expiry_keys(n.pidbox),
                KeyPattern(
                    f"{BINDING_PREFIX}{n.reply_pidbox}",
                    "R",
                    "SMEMBERS to route a reply to the requester's queue",
                ),
                KeyPattern(
                    f"*.{n.pidbox}*",
                    "W",
                    "LPUSH of a reply to <ticket>.reply.celery.pidbox; DEL of its own "
                    "<node>.celery.pidbox queue when it stops",
                ),
            ),
            channels=(ChannelPattern(f"{n.fanout}{n.pidbox}", "PSUBSCRIBE of exactly this"),),
            commands=("+psubscribe", "+punsubscribe", "+unsubscribe", "+time"),
            data_commands=("+lpush", "+smembers"),
        ),
    }


def _binding_expiry_keys(exchange: str) -> tuple[KeyPattern, ...]:
    """The keys by which an expiring queue bound to `exchange` keeps its binding (kombu 5.7)."""
    return (
        KeyPattern(
            f"{PERMANENT_BINDING_PREFIX}{exchange}",
            "RW",
            "SREM when the queue goes; EXISTS by a sweep (a permanent binding is kept)",
        ),
        KeyPattern(
            BINDING_DEADLINES,
            "RW",
            "the binding's deadline: ZADD by kombu's refresh script, ZRANGEBYSCORE and ZREM "
            "by its sweep",
        ),
    )


_ROLE_WHY = {
    WORKER: "`drover worker --host H` on each hypervisor: runs phases, admits waiting jobs, "
    "plans evacuations, fires scheduled ones; sends tasks to other hosts",
    PRODUCER: "the CLI and the Python API (and `drover lab`): submit, admit, abort, follow, "
    "schedule",
    FLOWER: "`drover flower`: watches Celery events and queue lengths; reads no job",
    BEAT: "`drover beat`: celery-redbeat's scheduler; sends scheduled evacuation tasks",
}
_ROLE_GRANTS = {
    WORKER: ("jobs", "scripts", "publish-tasks", "consume-tasks", "send-events"),
    PRODUCER: ("jobs", "scripts", "publish-tasks", "send-events"),
    FLOWER: ("receive-events", "queue-lengths"),
    BEAT: ("schedules", "scripts", "publish-tasks", "send-events"),
}
# While workers serve remote control: they answer it; producers (`drover lab`'s start-up
# ping, `celery inspect`) and Flower's worker pages ask.
_CONTROL_GRANTS = {WORKER: "serve-control", PRODUCER: "send-control", FLOWER: "send-control"}


def roles(names: BrokerNames) -> dict[str, Role]:
    """Every role with its grants, for these broker names."""
    available = grants(names)
    out = {}
    for role in ROLES:
        chosen = list(_ROLE_GRANTS[role])
        if names.remote_control and role in _CONTROL_GRANTS:
            chosen.append(_CONTROL_GRANTS[role])
        out[role] = Role(role, _ROLE_WHY[role], tuple(available[g] for g in chosen))
    return out


def user_name(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return f"{USER_PREFIX}{role}"


def check_password(name: str, password: str) -> str:
    """A password fit for an ACL line and a URL; ConfigError naming `name`, never the value."""
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ConfigError(
            f"{name} must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters "
            "(openssl rand -hex 32)"
        )
    if not _PASSWORD.match(password):
        raise ConfigError(
            f"{name} may hold only letters, digits and . _ ~ - (it goes into redis:// URLs)"
        )
    return password


def password_rule(password: str) -> str:
    """`#<sha256>`: Redis checks the password against the hash; the file never holds it."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


# The default user stays `off`: no connection can ever act as it (a client that has not
# authenticated may only AUTH or HELLO). Its permissions are nonetheless all: Redis (7.0.15,
# Debian 12's) replays its AOF as the default user and re-checks every MULTI/EXEC block
# against that user's rules, so with `-@all` each transaction (job creation, transitions,
# the effects of admission's scripts) is silently dropped on restart (redis/redis#14541,
# fixed upstream by #14545; tests/unit/test_redis_acl.py restarts a real server to prove it).
DEFAULT_USER_RULE = "user default off resetpass resetkeys resetchannels ~* &* +@all"


def render_acl(
    passwords: Mapping[str, str],
    names: BrokerNames | None = None,
    *,
    previous: Mapping[str, str] | None = None,
) -> str:
    """The ACL file for Redis's `aclfile`: the default user off, a PING-only health user,
    and one user per role with the role's password (and its previous one, while rotating)."""
    names = names or BrokerNames()
    previous = previous or {}
    missing = [r for r in ROLES if r not in passwords]
    if missing:
        raise ConfigError(f"no password for role {missing[0]} ({PASSWORD_ENV.format('ROLE')})")
    unknown = sorted(set(passwords) - set(ROLES)) + sorted(set(previous) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    for role in ROLES:
        check_password(PASSWORD_ENV.format(role.upper()), passwords[role])
        if role in previous:
            check_password(PREVIOUS_PASSWORD_ENV.format(role.upper()), previous[role])
    current = [passwords[r] for r in ROLES]
    if len(set(current)) != len(current):
        raise ConfigError("every role needs a password of its own (two roles share one)")
    lines = [
        DEFAULT_USER_RULE,
        f"user {HEALTH_USER} on nopass resetkeys resetchannels -@all +ping",
    ]
    for spec in roles(names).values():
        secrets = [password_rule(passwords[spec.name])]
        if spec.name in previous:
            secrets.append(password_rule(previous[spec.name]))
        lines.append(" ".join(["user", spec.user, "on", "resetpass", *secrets, *spec.rules()]))
    return "\n".join(lines) + "\n"


def role_url(url: str, role: str, password: str) -> str:
    """`url` (redis:// or rediss://) with the role's user and password in it."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user_name(role)}:{password}@{host}"))


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte on (an ACL
    file, a config holding a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(PRIVATE_FILE_MODE)  # a file that existed keeps its old mode through O_CREAT
