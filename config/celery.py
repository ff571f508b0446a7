"""The Celery app, so that `celery -A config worker|inspect|events|flower` works as usual.

Producers send phase tasks by name (they never import worker code or libvirt); each phase is
routed explicitly to the queue of the host that owns it.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from config import envelope
from config.redis_sentinel import is_sentinel, kombu_broker
from config.security import TASK_PREFIX, enable_signing, message_life, signing_config
from config.settings import ConfigError, Settings, Tunables, current, load_settings

QUEUE_PREFIX = "drover.host."
# kombu's Redis transports, dropping a queue item that is not a message instead of stopping
# the worker on it (config/broker_transport.py); named, so kombu imports them only to connect.
CONSUMER_TRANSPORT = "config.broker_transport:Transport"
SENTINEL_CONSUMER_TRANSPORT = "config.broker_transport:SentinelTransport"
WORKER_NODE_PREFIX = "drover@"
# A worker's consumer, by name: importing it here would load Celery's worker into every
# producer (the CLI's start-up); its delay is handed to it in the app's settings.
TASK_EVENTS_CONSUMER = "config.task_events:DelayedEventsConsumer"
TASK_EVENT_FLUSH_DELAY = "drover_task_event_flush_delay"


def host_queue(host: str) -> str:
    return f"{QUEUE_PREFIX}{host}"


def worker_node(host: str) -> str:
    return f"{WORKER_NODE_PREFIX}{host}"


def broker_of(settings: Settings) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL and the transport options it needs beside it: a Sentinel set
    becomes kombu's `sentinel://` parts plus the master's name (config/redis_sentinel.py)."""
    if is_sentinel(settings.redis_url):
        return kombu_broker(settings.redis_url)
    return settings.redis_url, {}


def use_consumer_transport(app: Celery, settings: Settings) -> None:
    """A worker reads its queue through drover's transport (config/broker_transport.py).

    Set on workers only, as they start and before they connect: a class path as transport
    also becomes the scheme of the connection's URI, which Flower reads to pick its broker
    client (its queue lengths); producers and Flower never consume a host's queue.
    """
    sentinel = is_sentinel(settings.redis_url)
    app.conf.broker_transport = SENTINEL_CONSUMER_TRANSPORT if sentinel else CONSUMER_TRANSPORT


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings chosen for long, non-repeatable phase tasks (see docs/celery.md)."""
    broker_url, transport = broker_of(settings)
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.tunables.broker_visibility_timeout,
            **transport,
        },
        # JSON only: a pickle payload from the broker would be code execution as root.
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_accept_content": ["json"],
        # drover keeps its own job records; Celery results would be a second, weaker copy.
        "task_ignore_result": True,
        # Each worker takes one message at a time per free slot: a long perform phase must not
        # sit on prefetched messages that another host's phases are waiting for.
        "worker_prefetch_multiplier": 1,
        # Ack on receipt: a perform phase must never be redelivered and run twice; a worker
        # that dies mid-phase is recovered from libvirt's real state instead.
        "task_acks_late": False,
        "task_default_queue": "drover.default",
        # Flower and `celery events` need these.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # ... published a moment later, together, off the hand-over (config/task_events.py).
        "worker_consumer": TASK_EVENTS_CONSUMER,
        TASK_EVENT_FLUSH_DELAY: settings.tunables.task_event_flush_delay,
        "worker_concurrency": settings.tunables.worker_concurrency,
        "worker_pool": "threads",
        # No remote control: a broadcast (shutdown, add_consumer, revoke, rate_limit, ...) is
        # an unsigned order anyone with the Redis password could give. Flower and `celery
        # events` still see every worker and task through events; liveness is drover's own
        # heartbeat (`drover hosts`).
        "worker_enable_remote_control": False,
        "include": ["worker.tasks", "worker.schedule_tasks"],
        # Signed messages replace plain JSON when `[security] signing` is on (config/security.py).
        **signing_config(settings),
    }


def make_app(settings: Settings | None = None) -> Celery:
    """An app for `settings`; without them, configured from the config file on first use.

    The lazy form lets `import config.celery` succeed even when the file is broken, so the
    error surfaces as one line where it is used rather than as an import traceback.
    """
    # Every task checks its message before it runs: size, content type, a job id only.
    celery_app = Celery("drover", task_cls="config.security:DroverTask")
    if settings is not None:
        celery_app.conf.update(celery_config(settings))
        enable_signing(celery_app, settings)
    else:
        celery_app.add_defaults(lambda: celery_config(load_settings()))
        celery_app.on_after_configure.connect(_enable_signing_when_configured, weak=False)
    return celery_app


def host_of_queue(queue: str) -> str:
    """The host a `drover.host.NAME` queue belongs to ("" for any other queue)."""
    return queue.removeprefix(QUEUE_PREFIX) if queue.startswith(QUEUE_PREFIX) else ""


def _stamp_envelope(
    sender: str | None = None,
    body: Any = None,
    routing_key: str | None = None,
    headers: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Put a fresh envelope into every drover message's (signed) body as it is published.

    Protocol 2 bodies are (args, kwargs, embed); the kwargs dict is the one serialized (and
    signed) right after this signal, so whoever sends (a producer, beat, a worker moving a
    chain on) needs no code of its own. Messages that are not drover's are left alone.
    """
    if not sender or not str(sender).startswith(TASK_PREFIX) or not isinstance(body, tuple):
        return
    args, kwargs = body[0], body[1]
    if not isinstance(kwargs, dict) or not args:
        return
    sent = time.time()
    kwargs[envelope.ENVELOPE_KEY] = envelope.stamp(
        str(sender),
        host_of_queue(routing_key or ""),
        str(args[0]),
        sent,
        _ttl_within(sent, (headers or {}).get("expires"), str(sender)),
    )


def _ttl_within(sent: float, expires: object, task: str = "") -> float:
    """The message's TTL: the fleet's, or less when the sender gave Celery an `expires` (an
    operator's control request is worth nothing once its producer stopped waiting for the
    answer: producer/control.py). Signed with the envelope, it cannot be stretched later."""
    ttl = _message_ttl(task)
    if isinstance(expires, str):
        try:
            left = datetime.fromisoformat(expires).timestamp() - sent
        except ValueError:
            return ttl
        ttl = min(ttl, max(left, 0.0))
    return ttl


before_task_publish.connect(_stamp_envelope, weak=False)


def _message_ttl(task: str = "") -> float:
    """The fleet's message TTL for `task` (config/security.py `message_life`); the default
    when this process's config cannot be read (a producer given its settings explicitly need
    not have a config file of its own)."""
    try:
        return message_life(task, current().tunables)
    except ConfigError:
        return message_life(task, Tunables())


def _enable_signing_when_configured(sender: Celery, **_: Any) -> None:
    enable_signing(sender, load_settings())


app = make_app()
