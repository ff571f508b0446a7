"""The checks a worker's consumer runs on each task message (config/security.py says which).

Apart from config/security.py because they build on Celery's worker classes (its Request and
default strategy, about 6 ms of imports): a producer imports config/security.py to sign what it
sends and never consumes, so only a worker, when Celery resolves DroverTask's `Request` and
`Strategy`, loads this module.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import InvalidTaskError
from celery.worker.consumer.consumer import INVALID_TASK_ERROR, UNKNOWN_TASK_ERROR
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from config import envelope
from config.security import TASK_PREFIX, argument_problem, excerpt, message_life, reject
from config.settings import current


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
    ttl = message_life(task, current().tunables)
    problem = envelope.problem(env, task=task, host=host, job=job_id, now=now, ttl=ttl)
    if problem is None and not nonces.first_sight(env.nonce, env.exp, now):
        problem = "replayed: this worker has seen its nonce before"
    return problem


class MessageRejected(InvalidTaskError):  # type: ignore[misc]
    """A refused message, already logged; the consumer discards it."""


def _refuse(reason: str, **fields: Any) -> MessageRejected:
    reject(reason, **fields)
    return MessageRejected(reason)


def _where(message: Any) -> dict[str, str]:
    headers = message.headers or {}
    return {
        "task": excerpt(headers.get("task")),
        "message_id": excerpt(headers.get("id")),
        "content_type": excerpt(message.content_type),
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
        where["task"] = excerpt(self.name)
        problem = argument_problem(task_args, task_kwargs, need_envelope=True)
        if problem is not None:
            raise _refuse(problem, args=excerpt(task_args), kwargs=excerpt(task_kwargs), **where)
        host = str(self.hostname).split("@", 1)[-1]
        problem = envelope_problem(
            str(self.name), host, task_args[0], task_kwargs[envelope.ENVELOPE_KEY]
        )
        if problem is not None:
            raise _refuse(f"envelope: {problem}", job=task_args[0], **where)


# Celery's consumer logs each message it discards with its full traceback and the body (a
# dozen lines and up to a KiB): anyone who can push to a queue could grow a worker's log at
# that rate. drover already said why (`message.rejected`) for what its checks refused.
CONSUMER_LOGGER = "celery.worker.consumer.consumer"


class RejectionsInOneLine(logging.Filter):
    """Drop Celery's record of a message drover's checks refused (said once already);
    shorten its record of any other discarded message to one line, without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in (INVALID_TASK_ERROR, UNKNOWN_TASK_ERROR):
            return True
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(exc, MessageRejected):
            return False
        what = "unregistered task" if record.msg is UNKNOWN_TASK_ERROR else "invalid message"
        record.msg, record.args = "discarded a task message (%s): %s", (what, excerpt(str(exc)))
        record.exc_info, record.exc_text = None, None
        return True


def rejections_in_one_line() -> None:
    """Install the filter on Celery's consumer logger (once, whatever the calls)."""
    consumer_log = logging.getLogger(CONSUMER_LOGGER)
    if not any(isinstance(f, RejectionsInOneLine) for f in consumer_log.filters):
        consumer_log.addFilter(RejectionsInOneLine())
