"""Redis ACL users, one per drover role: the keys, channels and commands each role needs.

Why: with one shared password, every process that reaches Redis can do anything there: read
and rewrite every job, consume another host's task messages, flush the database, reconfigure
or shut down the server. Signed messages (docs/security.md) stop forged *tasks*, not the
rest. So each role gets a Redis user of its own, holding what its code paths use and no
more, read off drover's key layout (jobs/, schedules/) and off kombu's Redis
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
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from config.redis_acl_grants import roles
from config.redis_acl_model import BEAT as BEAT
from config.redis_acl_model import FLOWER as FLOWER
from config.redis_acl_model import HEALTH_USER as HEALTH_USER
from config.redis_acl_model import PRODUCER as PRODUCER
from config.redis_acl_model import ROLES as ROLES
from config.redis_acl_model import USER_PREFIX as USER_PREFIX
from config.redis_acl_model import WORKER as WORKER
from config.redis_acl_model import BrokerNames as BrokerNames
from config.redis_sentinel import is_sentinel, with_user
from config.settings import ConfigError

# Passwords go into redis:// URLs as they are, so only URL-unreserved characters.
MIN_PASSWORD_CHARS = 16
MAX_PASSWORD_CHARS = 256
_PASSWORD = re.compile(r"^[A-Za-z0-9._~-]+\Z")
PASSWORD_ENV = "DROVER_REDIS_{}_PASSWORD"
# A second accepted password of a role while it is being rotated (docs/redis-acl.md).
PREVIOUS_PASSWORD_ENV = "DROVER_REDIS_{}_PASSWORD_PREVIOUS"
PRIVATE_FILE_MODE = 0o600


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
    """`url` (redis://, rediss:// or a Sentinel set) with the role's user and password."""
    if is_sentinel(url):
        return with_user(url, user_name(role), password)
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
