"""`drover worker --host NAME`: the Celery worker of one hypervisor host.

It consumes only its host's queue, so every phase runs beside the libvirtd it concerns.
"""

from __future__ import annotations

from config.celery import app, host_queue, worker_node
from config.settings import current
from worker.libvirt_host import LibvirtUnavailable
from worker.runtime import init_runtime


class WorkerStartError(Exception):
    pass


def run_worker(host: str, *, loglevel: str = "INFO") -> None:
    settings = current()
    settings.host(host)  # unknown host: one-line ConfigError
    rt = init_runtime(host)
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
