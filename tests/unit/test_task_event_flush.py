"""A worker's Celery task events go out a moment later, together, and none is lost at a stop.

A real Celery worker (threads pool, its event loop) on a real Redis runs a task; Celery's
own event receiver, as Flower uses it, counts what arrives and when.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.utils.imports import symbol_by_name

from config.celery import TASK_EVENT_FLUSH_DELAY, host_queue, make_app, worker_node
from config.settings import Settings, Tunables
from config.task_events import DelayedEventsConsumer
from tests.conftest import RedisServer
from tests.support.lab_fixtures import wait_for
from tests.unit.test_task_events import Received, receiving

DELIVERED_S = 15.0
RAN_S = 15.0
# Longer than any turn of the worker's event loop (its poll waits at most a second without
# timers), so that only the delay can account for events arriving this late.
DELAY_S = 3.0
# The longest delay allowed: the worker stops long before it runs out, so the events can
# only arrive through the stop.
NEVER_S = 5.0
TASK_PREFIX = "drover.test_event_flush"
JOB_ID = "0123456789ab"
TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


class Arrivals(Received):
    """Task events by uuid, each with the time it arrived here and the time it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, list[tuple[str, float, float]]] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        super().on_event(event)
        if event["type"].startswith("task-"):
            with self.lock:
                seen = self.events.setdefault(event["uuid"], [])
                seen.append((event["type"], time.time(), float(event["timestamp"])))

    def of(self, task_id: str) -> list[tuple[str, float, float]]:
        with self.lock:
            return list(self.events.get(task_id, []))


@contextmanager
def arrivals_of(app: Celery) -> Iterator[Arrivals]:
    arrivals = Arrivals()
    with receiving(app, arrivals):
        yield arrivals


class Worker:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self.ran = threading.Event()
        suffix = uuid.uuid4().hex[:8]
        self.task = f"{TASK_PREFIX}_{suffix}"  # one per app: Celery warns
        self.host = f"flush-{suffix}"  # the envelope names the host whose queue it is for

    def send(self) -> str:
        return str(self.app.send_task(self.task, args=(JOB_ID,), queue=host_queue(self.host)).id)

    def started(self) -> Any:
        return start_worker(
            self.app,
            pool="threads",
            concurrency=2,
            perform_ping_check=False,
            hostname=worker_node(self.host),
        )


@contextmanager
def worker_app(redis_srv: RedisServer, delay: float) -> Iterator[Worker]:
    settings = Settings(redis_url=redis_srv.url, tunables=Tunables(task_event_flush_delay=delay))
    app = make_app(settings)
    worker = Worker(app)
    app.conf.update(include=[], task_default_queue=host_queue(worker.host))

    @app.task(name=worker.task)
    def flush_probe(job_id: str) -> None:
        worker.ran.set()

    yield worker


def test_drover_workers_use_the_delayed_consumer_with_the_configured_delay(
    redis_srv: RedisServer,
) -> None:
    with worker_app(redis_srv, 0.25) as w:
        assert symbol_by_name(w.app.conf.worker_consumer) is DelayedEventsConsumer
        assert w.app.conf[TASK_EVENT_FLUSH_DELAY] == 0.25
    assert Tunables().task_event_flush_delay > 0


def test_a_tasks_events_arrive_together_after_the_delay(redis_srv: RedisServer) -> None:
    with (
        worker_app(redis_srv, DELAY_S) as w,
        arrivals_of(w.app) as arrivals,
        w.started(),
    ):
        task_id = w.send()
        assert w.ran.wait(RAN_S), "the task did not run"
        wait_for(
            lambda: {t for t, _, _ in arrivals.of(task_id)} >= set(TASK_EVENTS),
            DELAY_S + DELIVERED_S,
            "the task's events",
        )
    seen = [e for e in arrivals.of(task_id) if e[0] in TASK_EVENTS]
    assert sorted(t for t, _, _ in seen) == sorted(TASK_EVENTS), seen
    first_sent = min(sent for _, _, sent in seen)
    arrived = [at for _, at, _ in seen]
    # Held for the delay from the first one, then published in one message.
    assert min(arrived) - first_sent >= DELAY_S * 0.9, seen
    assert max(arrived) - min(arrived) < DELAY_S / 2, seen
    # The sender's own `task-sent` is not the worker's to hold: it came at once.
    [(_, sent_arrived, sent_at)] = [e for e in arrivals.of(task_id) if e[0] == "task-sent"]
    assert sent_arrived - sent_at < DELAY_S / 2


def test_events_still_held_when_the_worker_stops_are_published(redis_srv: RedisServer) -> None:
    with worker_app(redis_srv, NEVER_S) as w, arrivals_of(w.app) as arrivals:
        with w.started():
            task_id = w.send()
            assert w.ran.wait(RAN_S), "the task did not run"
        wait_for(
            lambda: {t for t, _, _ in arrivals.of(task_id)} >= set(TASK_EVENTS),
            DELIVERED_S,
            "the task's events, published as the worker stopped",
        )


@pytest.mark.parametrize("delay", [-1.0, 6.0])
def test_a_delay_out_of_range_is_refused(delay: float) -> None:
    with pytest.raises(ValueError, match="task_event_flush_delay"):
        Tunables(task_event_flush_delay=delay)
