"""`drover worker --host NAME`: the Celery worker of one hypervisor host.

It consumes only its host's queue, so every phase runs beside the libvirtd it concerns.
"""

from __future__ import annotations

from config.celery import app, host_queue, worker_node
from config.events import get_logger
from config.settings import Settings, current
from schedules.beat import LOG_LEVELS  # what `--loglevel` may be, as `drover beat` takes it
from worker.ledger import LedgerError
from worker.libvirt_events import start_event_loop
from worker.libvirt_host import LibvirtUnavailable
from worker.runtime import init_runtime

log = get_logger()
UNSIGNED_REFUSAL = (
    "refusing to start without signing: anyone with the Redis password could then make this "
    "worker act on its host; set [security] signing = true (docs/security.md), or "
    "insecure = true to run unprotected"
)


class WorkerStartError(Exception):
    pass


class BadLoglevel(WorkerStartError):
    """A `--loglevel` Celery would refuse only after the worker has connected to libvirt."""


def check_loglevel(loglevel: str) -> str:
    """`loglevel` in upper case, or BadLoglevel (one line) before anything starts."""
    if loglevel.upper() not in LOG_LEVELS:
        raise BadLoglevel(f"--loglevel {loglevel!r}: one of {', '.join(LOG_LEVELS)}")
    return loglevel.upper()


def check_security(settings: Settings, *, announce: bool = True) -> None:
    """Secure by default: a worker runs unsigned only where the config says so, and says so.

    Every start of an insecure worker logs a warning, so the choice never goes unnoticed.
    """
    if settings.security.signing:
        return
    if not settings.security.insecure:
        raise WorkerStartError(UNSIGNED_REFUSAL)
    if announce:  # once per start: the worker_init signal (worker/tasks.py) announces it
        log.warning(
            "security.insecure",
            reason="signing is off ([security] insecure = true): requests and task messages "
            "are not verified; anyone who can write to Redis controls this worker",
        )


def run_worker(host: str, *, loglevel: str = "INFO") -> None:
    loglevel = check_loglevel(loglevel)
    settings = current()
    settings.host(host)  # unknown host: one-line ConfigError
    check_security(settings, announce=False)
    start_event_loop()  # before the first libvirt connection opens (worker/libvirt_events.py)
    try:
        rt = init_runtime(host)
    except LedgerError as exc:
        raise WorkerStartError(str(exc)) from None
    try:
        rt.libvirt.conn.getHostname()
    except LibvirtUnavailable as exc:
        raise WorkerStartError(str(exc)) from None
    app.worker_main(
        [
            "worker",
            "--hostname",
            worker_node(host),
            "--queues",
            host_queue(host),
            "--loglevel",
            loglevel,
            "--without-mingle",
            "--without-gossip",
            "--task-events",
        ]
    )
