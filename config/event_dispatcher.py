"""An event dispatcher that keeps every task event when the worker runs its tasks in threads.

drover's workers use Celery's `threads` pool on Redis, so the worker has an event loop (the
"hub") and Celery buffers `task-*` events: `EventDispatcher.send` appends each one to a group
buffer without taking the dispatcher's lock, and asks the hub to `flush()`. Before Celery
5.7.0, `flush()` publishes the buffer under the lock and then empties it, so an event that a
pool thread appends while the hub is publishing (a network round trip to Redis) is thrown
away unsent. The usual victim is `task-started`: a pool thread sends it just as the hub
flushes the `task-received` before it, so Flower and `celery events` see the task go from
RECEIVED to SUCCESS and never show a running `drover.perform` as STARTED.

This is celery/celery#10434, fixed upstream by celery/celery#10435 ("don't drop buffered
events appended during publish"), released in Celery 5.7.0. `ThreadSafeEventDispatcher`
backports that release's `flush()` with no change to `send()`: under the lock it publishes a
detached copy of each group buffer and then deletes only the events it copied, so events
appended meanwhile wait for the next flush. The same `flush()` also replays the buffer of
events that could not be sent while Redis was away under the lock, emptying it before the
replay instead of after (celery/celery#6487, #10401: stock `flush()` clears it outside the
lock, dropping events that fail again or that another thread's failed publish adds), and
never re-buffers a batch as the list it then empties (celery/celery#10417).

Celery 5.7.0 and later need none of this (and their `flush()` also knows about a closed
dispatcher), so there `DroverEvents` keeps Celery's own dispatcher. Delete this module, and
its line in `config.celery.make_app`, once the lock file pins Celery 5.7.0 or later.
"""

from __future__ import annotations

import celery
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

# The first Celery release whose EventDispatcher.flush() keeps events appended during it.
UPSTREAM_FIX = (5, 7)
STOCK_DISPATCHER_PATH = "celery.events.dispatcher:EventDispatcher"
DISPATCHER_PATH = "config.event_dispatcher:ThreadSafeEventDispatcher"
EVENTS_PATH = "config.event_dispatcher:DroverEvents"


def celery_has_upstream_fix() -> bool:
    return (celery.VERSION.major, celery.VERSION.minor) >= UPSTREAM_FIX


class ThreadSafeEventDispatcher(EventDispatcher):  # type: ignore[misc]
    """`EventDispatcher` whose `flush()` never drops events appended while it publishes.

    `send()` still appends without the lock (a list append is atomic); `flush()` removes,
    under the lock, only the events it has published, so the two can interleave freely.
    """

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        """Publish the buffered events; events buffered meanwhile wait for the next flush."""
        if errors:
            with self.mutex:
                buf = list(self._outbound_buffer)
                # Emptied first: a replayed event that fails again is re-buffered by _publish.
                self._outbound_buffer.clear()
                for event, routing_key, *_exc in buf:
                    self._publish(event, self.producer, routing_key)
        if groups:
            with self.mutex:
                # A snapshot: a first send() for a new group may add a key meanwhile.
                for group, events in list(self._group_buffer.items()):
                    if not events:
                        continue
                    # A detached copy: on failure _publish re-buffers the object it is given.
                    batch = list(events)
                    self._publish(batch, self.producer, f"{group}.multi")
                    # Only what was published: pool threads append during the socket write.
                    del events[: len(batch)]


class DroverEvents(Events):  # type: ignore[misc]
    """`app.events` with a dispatcher that keeps buffered events: `Celery(events=EVENTS_PATH)`.

    The worker's Events bootstep builds its dispatcher from `app.events.Dispatcher`, which
    Celery makes from `dispatcher_cls`; receivers (Flower, `celery events`) are unchanged.
    """

    dispatcher_cls = STOCK_DISPATCHER_PATH if celery_has_upstream_fix() else DISPATCHER_PATH
