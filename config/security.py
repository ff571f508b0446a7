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

The checks run in the consumer (`checked_strategy`, `CheckedRequest`: config/message_checks.py,
which only a worker imports), so a refused message is discarded before it reaches the pool;
the task's `__call__` checks the arguments again for calls that bypass the consumer. Each
refusal is logged as a structured `message.rejected` event, without the message's content
beyond a short, escaped excerpt.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.serialization import registry as serializer_registry

from config import envelope
from config.events import get_logger
from config.settings import ConfigError, Security, Settings, Tunables

JOB_ID = re.compile(r"^[0-9a-f]{12}\Z")
EXCERPT_CHARS = 80
# Every drover task's name starts so; anything else a worker knows is Celery's own.
TASK_PREFIX = "drover."
# An operator's cancel of a job, told to its hosts' workers (worker/cancel_notice.py). Its
# message lives as long as the job's signed request may (`request_max_age`), not the usual
# `message_ttl`: a worker away for longer than that must still hear of it when it is back.
CANCEL_NOTICE_TASK = f"{TASK_PREFIX}cancel_notice"
# An operator's abort of a running migration, told to its source's worker the same way: the
# record's abort flag alone was anyone's to delete (attacker probe: the migration went on).
ABORT_NOTICE_TASK = f"{TASK_PREFIX}abort_notice"
NOTICE_TASKS = frozenset({CANCEL_NOTICE_TASK, ABORT_NOTICE_TASK})
AUTH_SERIALIZER = "auth"  # Celery's signed serializer, as kombu's registry names it


def message_life(task: str, tunables: Tunables) -> float:
    """How long a message of `task` may be valid (its envelope's TTL at most)."""
    return tunables.request_max_age if task in NOTICE_TASKS else tunables.message_ttl


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


def reject(reason: str, **fields: Any) -> None:
    """Log the structured security event for a refused message."""
    # The logger is looked up here, not at import: structlog is a worker's, and a producer
    # that imports this module to sign its messages never logs a refusal.
    get_logger().warning("message.rejected", reason=reason, **fields)


def excerpt(value: object) -> str:
    """A short, escaped excerpt of what a refused message carried, for its log event."""
    return repr(value)[:EXCERPT_CHARS]


class DroverTask(Task):  # type: ignore[misc]
    """The base of every drover task: checked requests, and arguments checked again on call."""

    # Celery imports these when a worker first consumes: a producer never needs them.
    Request = "config.message_checks:CheckedRequest"
    Strategy = "config.message_checks:checked_strategy"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        problem = argument_problem(args, kwargs)
        if problem is not None:
            reject(problem, task=self.name, args=excerpt(args), kwargs=excerpt(kwargs))
            raise Reject(problem, requeue=False)
        # The envelope was checked with the message (CheckedRequest); the task needs none.
        return super().__call__(*args)


def ensure_signing(app: Celery, settings: Settings) -> None:
    """Sign with `settings`' key from now on, whatever identity was registered before.

    Only one identity can be registered per process; a process that talks to two fleets
    (the test suite, with one lab after another) re-registers before it publishes.
    """
    # Registering loads the private key, which costs tens of milliseconds (the key's
    # consistency check): once per identity, not once per publish. A registration made
    # behind our back (Celery's own setup_security, another fleet) replaced kombu's encoder,
    # and new key files at the same paths (a lab brought up again) have new stamps: either
    # one registers again.
    if settings.security.signing and not _registered.current(settings.security):
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
    identity = _identity(settings.security)  # stamped before the files are read
    try:
        app.setup_security(allowed_serializers=["json"], digest=settings.security.digest)
    except Exception as exc:  # unreadable key, a non-RSA or expired certificate, ...
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"[security] signing: {message}") from None
    _registered.remember(identity)


Identity = tuple[Any, ...]


def _identity(sec: Security) -> Identity | None:
    """The signing identity as the files on disk are now: paths, digest, and each file's
    (and the cert store directory's) inode, size and change times; None if one is missing
    (registering then says why)."""
    stamps: list[Any] = [sec.digest]
    for path in (sec.key, sec.certificate, sec.cert_store):
        stamp = _stamp(path or "")
        if stamp is None:
            return None
        stamps.append(stamp)
    return tuple(stamps)


# Where _identity puts the key's stamp: after the digest, before the certificate's.
_KEY_STAMP = 1


def _stamp(path: str) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_checked(path: str) -> bool:
    """Whether Celery's signing setup in this process loaded the key at `path` as the file is
    now. Loading an RSA key checks its consistency (tens of milliseconds); the request signer
    loading the same file next need not check it again (jobs/request_signing.py)."""
    return _registered.key_checked(path)


def _auth_encoder() -> object:
    """The encoder kombu's process-wide registry holds for `auth` now (None if none)."""
    codec = serializer_registry._encoders.get(AUTH_SERIALIZER)
    return None if codec is None else codec.encoder


class _Registration:
    """The identity this process registered last, and the encoder that registration put in
    kombu's registry: still current while both are unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._identity: Identity | None = None
        self._encoder: object = None

    def remember(self, identity: Identity | None) -> None:
        with self._lock:
            self._identity, self._encoder = identity, _auth_encoder()

    def key_checked(self, path: str) -> bool:
        with self._lock:
            identity = self._identity
        return identity is not None and _stamp(path) == identity[_KEY_STAMP]

    def current(self, sec: Security) -> bool:
        identity = _identity(sec)
        with self._lock:
            return (
                identity is not None
                and identity == self._identity
                and self._encoder is not None
                and _auth_encoder() is self._encoder
            )


_registered = _Registration()
