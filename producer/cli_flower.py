"""`drover flower`: Flower on the fleet's broker.

It runs the same Flower as `celery -A config flower`, on the app `make_app` builds from the
config file, so Flower signs its inspect requests like any drover process when `[security]
signing` is on (workers obey only signed control messages) and reads the workers' events,
which stay JSON. Two defaults differ from Flower's, because a worker runs as root beside
libvirtd: Flower listens on the loopback address unless told otherwise, and it is read-only
unless `--allow-control` is given (its shutdown, revoke, pool and consumer buttons would
bypass drover's own abort and recovery; a consumer added to a worker would point it at
another host's phases).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from celery import Celery

    from config.settings import Settings

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
MAX_PORT = 65535
BASIC_AUTH_ENV = "FLOWER_BASIC_AUTH"
# A refused or silent Redis is reported before Flower starts, instead of Flower logging
# reconnection attempts forever.
REDIS_CHECK_TIMEOUT_S = 5.0
LOOPBACK_NAMES = frozenset({"localhost"})


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `drover` CLI."""
    app.command()(flower)


def flower(
    port: Annotated[
        int, typer.Option("--port", min=1, max=MAX_PORT, help="port of the web UI and API")
    ] = DEFAULT_PORT,
    address: Annotated[
        str, typer.Option("--address", help="address to listen on (loopback by default)")
    ] = DEFAULT_ADDRESS,
    basic_auth: Annotated[
        str | None,
        typer.Option(
            "--basic-auth",
            envvar=BASIC_AUTH_ENV,
            show_envvar=True,
            help="USER:PASSWORD[,USER:PASSWORD...]: HTTP basic auth for the UI and the API",
        ),
    ] = None,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only/--allow-control",
            help="read-only (default), or allow Flower's worker and task controls",
        ),
    ] = True,
) -> None:
    """Run Flower (web UI and HTTP API) on the fleet's broker: workers, host queues, tasks."""
    from producer.cli import EXIT_USAGE, fail, guarded

    problem = _auth_problem(basic_auth) or _exposure_problem(address, basic_auth)
    if problem is not None:
        fail(problem, EXIT_USAGE)

    def go() -> None:
        from config.settings import load_settings

        settings = load_settings()
        _check_redis(settings)
        argv = [
            "flower",
            f"--port={port}",
            f"--address={address}",
            f"--read_only={read_only}",
        ]
        if basic_auth:
            argv.append(f"--basic_auth={basic_auth}")
        try:
            _flower_app(settings).start(argv)
        except OSError as exc:  # the port is taken, the address is not ours, ...
            fail(f"Flower cannot listen on {address}:{port}: {exc.strerror or exc}")

    guarded(go)


def _auth_problem(basic_auth: str | None) -> str | None:
    """Why the credentials would not work in Flower (which splits them on commas)."""
    if basic_auth is None:
        return None
    for credential in basic_auth.split(","):
        user, colon, password = credential.partition(":")
        if not (user and colon and password):
            return f"--basic-auth (or {BASIC_AUTH_ENV}) must be USER:PASSWORD[,USER:PASSWORD...]"
    return None


def _exposure_problem(address: str, basic_auth: str | None) -> str | None:
    """Refuse to show the fleet to a network without a password."""
    if basic_auth or _is_loopback(address):
        return None
    return (
        f"--address {address or '(all)'} would show the fleet to the network without a "
        f"password: add --basic-auth USER:PASSWORD (or set {BASIC_AUTH_ENV})"
    )


def _is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name, or empty (every interface)
        return False


def _check_redis(settings: Settings) -> None:
    """One line now (via `guarded`) rather than Flower retrying a dead broker in its log."""
    import redis

    from producer.api import BrokerUnavailable, redis_location

    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=REDIS_CHECK_TIMEOUT_S,
        socket_timeout=REDIS_CHECK_TIMEOUT_S,
    )
    try:
        client.ping()
    except redis.AuthenticationError:
        raise
    except redis.RedisError as exc:
        location = redis_location(settings.redis_url)
        raise BrokerUnavailable(f"cannot reach Redis at {location}: {exc}") from None
    finally:
        client.close()


def _flower_app(settings: Settings) -> Celery:
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
