"""The parts of a Redis ACL: key and channel patterns, grants, roles, and the broker's names.

config/redis_acl_grants.py says what each role is granted; config/redis_acl.py renders the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from config.celery import QUEUE_PREFIX, celery_config
from config.redis_sentinel import is_sentinel, parse_sentinel_url
from config.settings import ConfigError, Settings

WORKER, PRODUCER, FLOWER, BEAT = "worker", "producer", "flower", "beat"
ROLES = (WORKER, PRODUCER, FLOWER, BEAT)
USER_PREFIX = "drover-"
# Only PING: a container health check or a readiness probe, with no password to hide.
HEALTH_USER = f"{USER_PREFIX}health"
MAX_DB = 15  # Redis's default `databases 16`

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
    """The database number of a redis:// URL (0 when it names none) or a Sentinel set."""
    if is_sentinel(url):
        try:
            return parse_sentinel_url(url).db
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    path = urlsplit(url).path.strip("/")
    if not path:
        return 0
    if not path.isdigit() or int(path) > MAX_DB:
        raise ConfigError(f"redis_url: database {path!r} is not a number from 0 to {MAX_DB}")
    return int(path)
