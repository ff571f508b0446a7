"""The envelope: what a task message's signed body says about where and when it may run.

Celery's `auth` serializer signs a message's body (args, kwargs, embedded chain) but not its
headers: the task name, id, ETA and expiry travel unsigned. A captured signed message could
therefore be re-headed as another task, pushed onto another host's queue, or replayed. So
every drover message carries, inside its signed body (kwargs `envelope`):

    task   the task name it was sent as      (a header swap no longer matches)
    host   the host whose queue it was sent to (a message moved to another queue is refused)
    job    the job id it is about             (the argument cannot be swapped)
    exp    when it stops being valid (epoch seconds; `tunables.message_ttl` after sending)
    nonce  random, remembered by the worker until `exp` (a replay is refused)

The envelope is stamped at publish time by a `before_task_publish` handler (config/celery.py),
so every sender (producers, beat, a worker moving a chain on, recovery) gets a fresh one
without knowing about it, and checked by the worker before a request is built
(config/security.py). Pure: no I/O here, the nonce memory is the worker's.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

ENVELOPE_KEY = "envelope"
NONCE_BYTES = 16
# A message stamped further in the future than its TTL allows (plus this) has a forged clock.
CLOCK_SKEW_S = 60.0
_NONCE = re.compile(r"^[0-9a-f]{32}\Z")
_FIELDS = frozenset({"task", "host", "job", "exp", "nonce"})


@dataclass(frozen=True)
class Envelope:
    task: str
    host: str
    job: str
    exp: float
    nonce: str


def stamp(task: str, host: str, job: str, now: float, ttl: float) -> dict[str, Any]:
    """A fresh envelope for a message about `job`, sent as `task` to `host`'s queue."""
    return {
        "task": task,
        "host": host,
        "job": job,
        "exp": round(now + ttl, 3),
        "nonce": secrets.token_hex(NONCE_BYTES),
    }


def parse(raw: object) -> Envelope:
    """The envelope of a message, or ValueError with one line saying what is wrong."""
    if not isinstance(raw, dict) or set(raw) != _FIELDS:
        raise ValueError("the message has no valid envelope")
    task, host, job, exp, nonce = (raw[k] for k in ("task", "host", "job", "exp", "nonce"))
    if not all(isinstance(v, str) for v in (task, host, job, nonce)):
        raise ValueError("the message's envelope is malformed")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:  # NaN
        raise ValueError("the message's envelope has no valid expiry")
    if not _NONCE.match(nonce):
        raise ValueError("the message's envelope has no valid nonce")
    return Envelope(task, host, job, float(exp), nonce)


def problem(env: Envelope, *, task: str, host: str, job: str, now: float, ttl: float) -> str | None:
    """Why a message with envelope `env` must not run as `task` on `host` for `job` now."""
    if env.task != task:
        return f"sent as {env.task[:60]!r}, delivered as {task[:60]!r}"
    if env.host != host:
        return f"sent to {env.host[:60]!r}, delivered to {host!r}"
    if env.job != job:
        return "the envelope names another job"
    if env.exp <= now:
        return f"expired {now - env.exp:.0f}s ago"
    if env.exp > now + ttl + CLOCK_SKEW_S:
        return "its expiry is further away than any sender may set"
    return None
