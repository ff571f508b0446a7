"""What a worker says once per key, not at every look: a refusal that stands pass after pass
(an attacker probe counted two lines a pass for a minute). The worker's threads (Celery's
pool, the keeper) look at once, so the check and the note are one step. Bounded: the keys
are job ids, anyone's to write."""

from __future__ import annotations

import threading

SAID_MAX = 4096


class SaidOnce:
    """The keys something was said of, in this process."""

    def __init__(self, limit: int = SAID_MAX) -> None:
        self._keys: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, key: str) -> bool:
        """True the first time `key` is asked of (then it is noted), False after."""
        with self._lock:
            if key in self._keys:
                return False
            if len(self._keys) >= self._limit:
                self._keys.clear()
            self._keys.add(key)
            return True
