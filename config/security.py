"""What a worker checks on every task message before any task code runs, and message signing.

Defence in depth behind the producer's validation (docs/security.md). A worker accepts a task
message only when

- its raw body is at most `tunables.max_message_bytes`;
- it decodes with an accepted content type: JSON, or with `[security] signing` only Celery's
  `auth` serializer, whose signature must verify against a certificate in the cert store
  (never pickle: kombu refuses it and `accept_content` does not list it);
- it names one of drover's own tasks (never a Celery built-in such as `celery.accumulate`,
  which would run with a job id as its argument and send on the chain in its body);
- it carries exactly one positional argument, a 12-hex job id, and one keyword argument, the
  envelope (config/envelope.py): sent as this task, to this host's queue, for this job, not
  expired, and with a nonce this worker has not seen before.

The checks run in the consumer (`checked_strategy`, `CheckedRequest`), so a refused message is
discarded before it reaches the pool; the task's `__call__` checks the
arguments again for calls that bypass the consumer. Each refusal is logged as a structured
`message.rejected` event, without the message's content beyond a short, escaped excerpt.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import InvalidTaskError, Reject
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from config import envelope
from config.events import get_logger
from config.settings import ConfigError, Settings, current

JOB_ID = re.compile(r"^[0-9a-f]{12}\Z")
EXCERPT_CHARS = 80
# Every drover task's name starts so; anything else a worker knows is Celery's own.
TASK_PREFIX = "drover."
log = get_logger()


def argument_problem(args: Any, kwargs: Any, *, need_envelope: bool = False) -> str | None:
    """Why a task's arguments are not a job id (and its envelope), or None when they are."""
    allowed = {envelope.ENVELOPE_KEY}
    if not isinstance(kwargs, dict) or set(kwargs) - allowed:
        return "keyword arguments"
    if not isinstance(args, list | tuple) or len(args) != 1:
        return "not exactly one argument"
    if not isinstance(args[0], str) or not JOB_ID.match(args[0]):
        return "argument is not a job id"
    if need_envelope and envelope.ENVELOPE_KEY not in kwargs:
        return "no envelope"
    return None


class NonceMemory:
    """The nonces of messages this worker has accepted, each kept until its envelope expires.

    In memory: a restarted worker forgets them, and a replay within the TTL after a restart
    is then stopped by the phase claims and the worker's own ledger (worker/ledger.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}

    def first_sight(self, nonce: str, expires: float, now: float) -> bool:
        """True the first time `nonce` is offered (and remember it until `expires`)."""
        with self._lock:
            if nonce in self._seen:
                return False
            self._seen = {n: e for n, e in self._seen.items() if e > now}
            self._seen[nonce] = expires
            return True


nonces = NonceMemory()


def envelope_problem(task: str, host: str, job_id: str, raw: object) -> str | None:
    """Why a message's envelope does not allow it to run here now (None: it does)."""
    try:
        env = envelope.parse(raw)
    except ValueError as exc:
        return str(exc)
    now = time.time()
    ttl = current().tunables.message_ttl
    problem = envelope.problem(env, task=task, host=host, job=job_id, now=now, ttl=ttl)
    if problem is None and not nonces.first_sight(env.nonce, env.exp, now):
        problem = "replayed: this worker has seen its nonce before"
    return problem


def reject(reason: str, **fields: Any) -> None:
    """Log the structured security event for a refused message."""
    log.warning("message.rejected", reason=reason, **fields)


def _excerpt(value: object) -> str:
    return repr(value)[:EXCERPT_CHARS]


class MessageRejected(InvalidTaskError):  # type: ignore[misc]
    """A refused message, already logged; the consumer discards it."""


def _refuse(reason: str, **fields: Any) -> MessageRejected:
    reject(reason, **fields)
    return MessageRejected(reason)


def _where(message: Any) -> dict[str, str]:
    headers = message.headers or {}
    return {
        "task": _excerpt(headers.get("task")),
        "message_id": _excerpt(headers.get("id")),
        "content_type": _excerpt(message.content_type),
    }


def checked_strategy(task: Task, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy behind a size limit; every refusal logged once.

    The default strategy decodes the body (refusing content types not accepted, unsigned or
    forged messages when signing is on) and builds a `CheckedRequest`; whatever it refuses is
    raised as InvalidTaskError, which the consumer logs and discards.
    """
    handler = default_strategy(task, app, consumer, **kwargs)

    def checked_handler(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        size = len(message.body or b"")
        limit = current().tunables.max_message_bytes
        if size > limit:
            raise _refuse(f"message of {size} bytes exceeds {limit}", **_where(message))
        if not task.name.startswith(TASK_PREFIX):
            raise _refuse(f"{task.name} is not a drover task", **_where(message))
        try:
            return handler(message, body, *args, **kw)
        except MessageRejected:
            raise
        except Exception as exc:  # undecodable, unsigned, forged, disallowed content type
            text = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"{type(exc).__name__}: {text}"[:200]
            raise _refuse(reason, **_where(message)) from None

    return checked_handler


class CheckedRequest(Request):  # type: ignore[misc]
    """A Celery request whose arguments must be one job id and a valid envelope for it."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        task_args, task_kwargs, _ = self._payload
        where = _where(message)
        where["task"] = _excerpt(self.name)
        problem = argument_problem(task_args, task_kwargs, need_envelope=True)
        if problem is not None:
            raise _refuse(problem, args=_excerpt(task_args), kwargs=_excerpt(task_kwargs), **where)
        host = str(self.hostname).split("@", 1)[-1]
        problem = envelope_problem(
            str(self.name), host, task_args[0], task_kwargs[envelope.ENVELOPE_KEY]
        )
        if problem is not None:
            raise _refuse(f"envelope: {problem}", job=task_args[0], **where)


class DroverTask(Task):  # type: ignore[misc]
    """The base of every drover task: checked requests, and arguments checked again on call."""

    Request = "config.security:CheckedRequest"
    Strategy = "config.security:checked_strategy"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        problem = argument_problem(args, kwargs)
        if problem is not None:
            reject(problem, task=self.name, args=_excerpt(args), kwargs=_excerpt(kwargs))
            raise Reject(problem, requeue=False)
        # The envelope was checked with the message (CheckedRequest); the task needs none.
        return super().__call__(*args)


def ensure_signing(app: Celery, settings: Settings) -> None:
    """Sign with `settings`' key from now on, whatever identity was registered before.

    Only one identity can be registered per process; a process that talks to two fleets
    (the test suite, with one lab after another) re-registers before it publishes.
    """
    # Registering again costs a millisecond or two (two PEM files); comparing a remembered
    # identity would miss a registration made behind our back (Celery's own setup_security).
    if settings.security.signing:
        enable_signing(app, settings)


def signing_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for signed messages (empty when signing is off)."""
    sec = settings.security
    if not sec.signing:
        return {}
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": sec.key,
        "security_certificate": sec.certificate,
        "security_cert_store": sec.cert_store,
        "security_digest": sec.digest,
    }


def enable_signing(app: Celery, settings: Settings) -> None:
    """Register Celery's `auth` serializer with this fleet's key (no-op when signing is off).

    The serializer registry is process-wide (kombu's); JSON stays the only other decoder.
    """
    if not settings.security.signing:
        return
    try:
        app.setup_security(allowed_serializers=["json"], digest=settings.security.digest)
    except Exception as exc:  # unreadable key, a non-RSA or expired certificate, ...
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"[security] signing: {message}") from None
