"""When a worker publishes the Celery task events Flower shows, so they stay off a hop.

A worker buffers its task events (received, started, succeeded, failed) and Celery's consumer
publishes the buffer at its event loop's next turn: right when a phase hands over to the next
(the message just taken from the queue, the phase's thread just starting), one Redis round
trip and its Python work in the loop's thread, competing with the phase's. Here the buffer is
published `task_event_flush_delay` after its first event instead, all its events in one
message (Celery's `task.multi`): a job's phases take a few milliseconds each, so most of a
job's events on a host go together, and none on the hand-over. Flower learns of a task that
much later; the job's own events (its stream) are not these and are written as they happen.

Set as the workers' `worker_consumer` (config/celery.py), with the delay beside it in the
app's settings. Celery dropped what its buffer held when the worker shut down before the
loop's next turn; here whatever is buffered is published as the consumer shuts down.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer
from vine import promise

from config.celery import TASK_EVENT_FLUSH_DELAY
from config.settings import Tunables


class DelayedEventsConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, its buffered task events published after a delay, together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = Tunables().task_event_flush_delay
        self.event_flush_delay = float(self.app.conf.get(TASK_EVENT_FLUSH_DELAY, default))
        self._flush_timer: Any = None  # the loop's timer entry (kombu's), while one is set
        # One promise, so that the loop's ready set holds at most one pending schedule.
        self._schedule_promise = promise(self._schedule_flush)

    def on_send_event_buffered(self) -> None:
        """Called by whichever thread buffered an event: the timer is set in the loop."""
        if self.hub:
            self.hub.call_soon(self._schedule_promise)

    def _schedule_flush(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.hub.call_later(self.event_flush_delay, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self._flush_events()

    def shutdown(self) -> None:
        """Whatever is still buffered goes out now: the loop that would have published it
        has stopped."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_events()
        super().shutdown()
