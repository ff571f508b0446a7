"""The worker's housekeeping thread: heartbeat, lease renewal, and the recovery sweep.

Kept out of the task code: phases never wait on it, and it never runs a migration itself
except to settle one that this host had started and lost (worker/recovery.py).
"""

from __future__ import annotations

import threading
import time

import redis

from config.events import get_logger
from worker import recovery
from worker.runtime import Runtime

log = get_logger()


class Keeper(threading.Thread):
    def __init__(self, rt: Runtime) -> None:
        super().__init__(name="drover-keeper", daemon=True)
        self.rt = rt
        self.stop = threading.Event()

    def run(self) -> None:
        next_sweep = 0.0  # sweep at once: recovery after a restart comes first
        while not self.stop.is_set():
            tunables = self.rt.settings.tunables  # re-read: the config file may have changed
            try:
                self.rt.store.heartbeat(self.rt.host, tunables.heartbeat_ttl)
                with self.rt.lock:
                    running = {job_id for job_id, _ in self.rt.running}
                for job_id in running:
                    self.rt.store.renew_leases(job_id, tunables.domain_lease)
                if time.monotonic() >= next_sweep:
                    recovery.sweep(self.rt)
                    next_sweep = time.monotonic() + tunables.watchdog_interval
            except redis.RedisError as exc:
                log.warning("keeper.redis_unavailable", error=str(exc))
            except Exception as exc:  # the keeper must outlive any one bad job
                log.exception("keeper.error", error=str(exc))
            self.stop.wait(tunables.heartbeat_interval)


_keepers: dict[str, Keeper] = {}


def start_keeper(rt: Runtime) -> None:
    if rt.host not in _keepers:
        _keepers[rt.host] = Keeper(rt)
        _keepers[rt.host].start()
