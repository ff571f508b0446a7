"""What a worker process holds for all its tasks: its host name, the job store, libvirt."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from config import events
from config.settings import Host, Settings, current
from jobs.phases import PHASE_NAMES
from jobs.store import JobStore
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtError, LibvirtHost, LibvirtUnavailable
from worker.metrics_host import HostCollector, HostSnapshot
from worker.metrics_registry import WorkerMetrics


@dataclass
class Runtime:
    host: str
    store: JobStore
    libvirt: LibvirtHost
    ledger: Ledger  # this host's own records (worker/ledger.py), never Redis
    # (job id, phase) pairs this process is executing now: recovery leaves them alone; and an
    # evacuation's in-process guards, (evacuation id, what), which have no mark in Redis.
    running: set[tuple[str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # This process among the workers of its host (two run side by side while one drains).
    worker_id: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(3)}")
    # Monotonic time the warm shutdown began, or None while the worker takes work.
    draining_since: float | None = None
    # The config problem last announced (worker/keeper.py), so it is said once per change.
    config_problem: str | None = None
    # (job, phase, worker) marks recovery found held by another live worker: said once each.
    noted_runners: set[tuple[str, str, str]] = field(default_factory=set)
    # (job, phase) steps whose record says "interrupted here" although this host's ledger
    # says the phase ended (or started) here: refused, and said once each.
    noted_contradictions: set[tuple[str, str]] = field(default_factory=set)
    # (job, phase) steps recovery leaves until this host's libvirtd answers: said once each.
    noted_libvirt_waits: set[tuple[str, str]] = field(default_factory=set)
    # Evacuations waiting for a destination's libvirtd to answer (worker/evacuation_watch.py):
    # the monotonic time this process began to wait, never a time read from Redis.
    confirm_waits: dict[str, float] = field(default_factory=dict)
    # Peers recovery found without a live worker: the monotonic times this process first and
    # last saw each so, on consecutive looks (worker/recovery.py), never a time from Redis.
    peers_unseen: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The exporter (worker/metrics_exporter.py): its registry, fed by the event chain; the
    # host as the keeper's last report tick saw it; whether it listens, or why not.
    metrics: WorkerMetrics | None = None
    host_snapshot: HostSnapshot | None = None
    metrics_server: WSGIServer | None = None
    metrics_problem: str | None = None

    def mark(self, job_id: str, what: str) -> bool:
        """Mark (job, what) as in hand in this process only; False if it already was."""
        with self.lock:
            if (job_id, what) in self.running:
                return False
            self.running.add((job_id, what))
            return True

    def unmark(self, job_id: str, what: str) -> None:
        with self.lock:
            self.running.discard((job_id, what))

    def marked(self, job_id: str, what: str) -> bool:
        with self.lock:
            return (job_id, what) in self.running

    @contextmanager
    def holding(self, job_id: str, what: str) -> Iterator[bool]:
        """`mark` for the length of a block: yields whether the mark is this block's (and
        only then removes it at the end)."""
        ours = self.mark(job_id, what)
        try:
            yield ours
        finally:
            if ours:
                self.unmark(job_id, what)

    def begin(self, job_id: str, phase: str) -> str | None:
        """Mark a phase as run by this process, here and in Redis: None when it is ours now,
        else the identity of the live worker already running it (leave it alone)."""
        if not self.mark(job_id, phase):
            return self.worker_id
        ttl = self.settings.tunables.heartbeat_ttl
        holder = self.store.take_runner(job_id, phase, self.worker_id, ttl)
        if holder is not None:
            self.unmark(job_id, phase)
        return holder

    def end(self, job_id: str, phase: str) -> None:
        self.unmark(job_id, phase)
        self.store.drop_runner(job_id, phase, self.worker_id)

    def renew_running(self) -> None:
        """Keep this process's marks on its phases alive (the heartbeat calls it)."""
        ttl = self.settings.tunables.heartbeat_ttl
        with self.lock:
            running = sorted((j, p) for j, p in self.running if p in PHASE_NAMES)
        self.store.renew_runners(running, self.worker_id, ttl)  # one round trip for all

    def libvirt_answers(self) -> bool:
        """Whether this host's libvirtd answers a call now (on a fresh connection if the last
        one broke: a restarted libvirtd leaves the old one looking alive)."""
        try:
            self.libvirt.conn.getLibVersion()
        except (LibvirtUnavailable, LibvirtError):
            self.libvirt.reset()
            return False
        return True

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def drained_for(self) -> float:
        """Seconds since the warm shutdown began (0 while not draining)."""
        return 0.0 if self.draining_since is None else time.monotonic() - self.draining_since

    @property
    def settings(self) -> Settings:
        return current()

    @property
    def registry_entry(self) -> Host:
        return self.settings.host(self.host)


_runtime: Runtime | None = None
_lock = threading.Lock()


def init_runtime(host: str) -> Runtime:
    """Create the process's runtime for `host` (once) and route its events to the job streams."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.host != host:
            settings = current()
            entry = settings.host(host)
            tunables = settings.tunables
            store = JobStore.from_settings(
                settings,
                retry_for=tunables.redis_retry_for,
                probe_timeout=tunables.redis_probe_timeout,
            )
            # Events go out through the store that fails at once, and are held through an
            # outage: a thread that logs never waits for Redis (config/events.py). Each
            # passes the worker's metrics on the way (worker/metrics_registry.py).
            metrics = WorkerMetrics(host, tunables.metrics_stale_after)
            events.configure(
                host,
                store.without_retry,
                hold_max=tunables.event_hold_max,
                flush_interval=tunables.event_flush_interval,
                observers=[metrics.observe],
            )
            rt = Runtime(
                host=host,
                store=store,
                libvirt=LibvirtHost(entry.libvirt_uri),
                ledger=Ledger(entry.state_dir),
                metrics=metrics,
            )
            metrics.registry.register(HostCollector(host, lambda: rt.host_snapshot))
            _runtime = rt
        return _runtime


def runtime_for_node(nodename: str) -> Runtime:
    """The runtime of the worker named `drover@HOST` (as Celery names it)."""
    return init_runtime(nodename.split("@", 1)[-1])
