"""Flower run in this process on the fleet's app: what `celery flower` does, with drover's
credentials, Host rule and silenced remote control (see producer/cli_flower.py)."""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from config.settings import Settings

# A refused or silent Redis is reported before Flower starts, instead of Flower logging
# reconnection attempts forever.
REDIS_CHECK_TIMEOUT_S = 5.0


def check_redis(settings: Settings) -> None:
    """One line now (via `guarded`) rather than Flower retrying a dead broker in its log."""
    import redis

    from jobs.connection import client_for
    from jobs.errors import BrokerUnavailable, redis_location

    client = client_for(settings.redis_url, probe_timeout=REDIS_CHECK_TIMEOUT_S)
    try:
        client.ping()
    except redis.AuthenticationError:
        raise
    except redis.RedisError as exc:
        location = redis_location(settings.redis_url)
        raise BrokerUnavailable(f"cannot reach Redis at {location}: {exc}") from None
    finally:
        client.close()


def silence_control(celery_app: Celery) -> None:
    """Flower's event capture broadcasts a `heartbeat` wake-up (and its timer enable_events)
    to the workers. Workers obey no remote control, so these go nowhere; not sending them
    keeps the flower Redis user to reading events and queue lengths (docs/redis-acl.md)."""

    def nowhere(*_: Any, **__: Any) -> list[Any]:
        return []

    celery_app.control.broadcast = nowhere


def run_flower(
    celery_app: Celery, argv: list[str], *, basic_auth: list[str], allowed: frozenset[str]
) -> None:
    """What `celery flower` does, with the credentials and the Host rule set in-process.

    The steps are those of flower.command.flower, minus reading FLOWER_* variables and a
    `flowerconfig.py` from the working directory (`--conf` is /dev/null).
    """
    import atexit
    import signal

    from flower import command
    from flower.app import Flower
    from flower.urls import settings as flower_settings
    from tornado.options import options

    from producer.flower_guard import host_rule

    command.apply_options("flower", [f"--conf={os.devnull}", *argv])
    options.basic_auth = basic_auth
    command.extract_settings()
    ssl_options = flower_settings.get("ssl_options")
    if ssl_options is not None and ssl_options.get("ca_certs"):
        ssl_options["cert_reqs"] = ssl.CERT_REQUIRED
    command.setup_logging()
    if not celery_app.conf.worker_enable_remote_control:
        silence_control(celery_app)
    app = Flower(capp=celery_app, options=options, **flower_settings)
    app.default_router.rules.insert(0, host_rule(allowed))
    atexit.register(app.stop)
    signal.signal(signal.SIGTERM, command.sigterm_handler)
    listening = app.start_http_server()
    command.print_banner(celery_app, ssl_options is not None, listening)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):  # SIGTERM's handler exits
        app.start()


def flower_app(settings: Settings) -> Celery:
    """The fleet's app, knowing every host's queue.

    Flower lists the queues its workers report consuming; when no worker answers (all down,
    or not started yet) it falls back to `task_queues`, so the registry's host queues, where
    phases wait for a host that is away, stay on the Broker page and in
    `/api/queues/length`. Producers and workers never read this setting: phases are routed
    explicitly.
    """
    from kombu import Exchange, Queue

    from config.celery import host_queue, make_app

    celery_app = make_app(settings)
    names = [host_queue(host) for host in settings.hosts]
    celery_app.conf.task_queues = [
        Queue(name, Exchange(name, "direct"), routing_key=name) for name in names
    ]
    return celery_app
