"""`drover exporter`: the fleet's series over HTTP for Prometheus, one active among standbys.

Why a process of its own: the figures that belong to no host (jobs by state, the waiting
line per limit, evacuations, schedules, which workers are alive) live in Redis; each worker
exports only its own host (worker exporter, docs/metrics.md). Any number of `drover exporter`
may run; the one holding the lease `EXPORTER_LEASE` (jobs/lease.py) serves the fleet, the
others serve `drover_exporter_active 0` and take over within `exporter_lease_ttl` of its
death (at once when it stops normally: it gives the lease back).

It runs until SIGTERM or SIGINT. It starts whether or not Redis answers (a scrape then says
`drover_exporter_redis_up 0`); a wrong password or a config error stops it at once. The
registry is read again when drover.toml changes (hosts, retention); the Redis URL and the
lease's timings are those it started with.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server

from config.settings import Settings, current
from jobs.connection import client_for
from jobs.keys import EXPORTER_LEASE
from jobs.lease import Lease
from producer.exporter_collector import REDIS_FAILURES, FleetCollector, decode_leniently
from producer.exporter_listen import Listen

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExporterStartError(Exception):
    """The exporter cannot start (Redis refuses its credentials, the port is taken); one line."""


class Exporter:
    """The HTTP server, the collector and the lease loop of one `drover exporter`."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        tunables = settings.tunables
        self.say = say
        self.client = decode_leniently(
            client_for(settings.redis_url, probe_timeout=tunables.exporter_redis_timeout)
        )
        self.lease = Lease(self.client, EXPORTER_LEASE, tunables.exporter_lease_ttl)
        self.renew_every = tunables.exporter_lease_renew
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(current, self.client, self.lease.held))
        self.stopping = threading.Event()
        self._was_active: bool | None = None
        self._redis_down = False

    def check_credentials(self) -> None:
        """Refuse to start on a password or ACL user Redis refuses; an outage is no refusal."""
        try:
            self.client.ping()
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            raise ExporterStartError(f"Redis refused the exporter: {exc}") from None
        except REDIS_FAILURES as exc:
            self._outage(exc)

    def serve(self, listen: Listen) -> None:
        """Serve until a stop signal, then give the lease back."""
        try:
            server, thread = start_http_server(listen.port, listen.address, self.registry)
        except OSError as exc:
            raise ExporterStartError(
                f"cannot listen on {listen.address}:{listen.port}: {exc.strerror or exc}"
            ) from None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)
        self.say(f"exporter serving {listen.url()} (lease {EXPORTER_LEASE})")
        try:
            while not self.stopping.is_set():
                self.tick()
                self.stopping.wait(self.renew_every)
        finally:
            server.shutdown()
            thread.join()
            self._give_back()

    def tick(self) -> None:
        """Take or renew the lease; say when this exporter becomes active or a standby."""
        try:
            self.lease.renew()
        except REDIS_FAILURES as exc:
            self._outage(exc)
        else:
            if self._redis_down:
                self._redis_down = False
                self.say("Redis answers again")
        active = self.lease.held()
        if active != self._was_active:
            self._was_active = active
            self.say(
                "active: serving the fleet"
                if active
                else "standby: the lease is another exporter's (or Redis is out of reach)"
            )

    def _outage(self, exc: Exception) -> None:
        if not self._redis_down:
            self._redis_down = True
            self.say(f"Redis unreachable ({exc}); scrapes say drover_exporter_redis_up 0")

    def _give_back(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):  # else it lapses by itself within the lease
            self.lease.release()
        self.client.close()

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping.set()


def run_exporter(settings: Settings, listen: Listen, say: Callable[[str], None]) -> None:
    """`drover exporter`: ExporterStartError (one line) when it cannot start."""
    exporter = Exporter(settings, say)
    exporter.check_credentials()
    exporter.serve(listen)
