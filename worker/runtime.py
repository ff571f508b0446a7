"""What a worker process holds for all its tasks: its host name, the job store, libvirt."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from config import events
from config.settings import Host, Settings, current
from jobs.store import JobStore
from worker.ledger import Ledger
from worker.libvirt_host import LibvirtHost


@dataclass
class Runtime:
    host: str
    store: JobStore
    libvirt: LibvirtHost
    ledger: Ledger  # this host's own records (worker/ledger.py), never Redis
    # (job id, phase) pairs this process is executing now: recovery leaves them alone.
    running: set[tuple[str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
            store = JobStore.from_url(
                settings.redis_url,
                event_maxlen=settings.tunables.event_stream_maxlen,
                retry_for=settings.tunables.redis_retry_for,
            )
            events.configure(host, store)
            _runtime = Runtime(
                host=host,
                store=store,
                libvirt=LibvirtHost(entry.libvirt_uri),
                ledger=Ledger(entry.state_dir),
            )
        return _runtime


def runtime_for_node(nodename: str) -> Runtime:
    """The runtime of the worker named `drover@HOST` (as Celery names it)."""
    return init_runtime(nodename.split("@", 1)[-1])
