"""Task events survive a flush that races with pool threads (celery/celery#10434).

Flower shows a running phase as STARTED only from its `task-started` event. Before Celery
5.7.0 the `threads` pool dropped some of those (an event a pool thread buffered while the
worker's event loop published the buffer was cleared unsent); drover carried a backport of
the fix until the lock pinned 5.7. These tests hold Celery's own dispatcher to it.

The dispatcher is the one drover's app gives its workers (`app.events.Dispatcher`), set up
as the worker's Events bootstep sets it up under the `threads` pool: `task-*` events are
buffered, each send asks the event loop to flush, and a full buffer is flushed by the sending
thread itself. Events go through a real Redis and are counted by Celery's own event receiver,
as Flower receives them. With Celery 5.6.3's `EventDispatcher` these tests lose events.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import celery
import pytest
from celery import Celery
from celery.events.dispatcher import EventDispatcher

import config.celery
from config.celery import make_app
from config.settings import Settings
from tests.conftest import RedisServer
from tests.support.lab_fixtures import wait_for

SENDER_THREADS = 8
EVENTS_PER_THREAD = 300
# Subscribing to the event channel and delivering a few thousand events: well under a second.
RECEIVER_READY_S = 15.0
DELIVERED_S = 30.0
JOIN_S = 30.0
PROBE_INTERVAL_S = 0.2
HOSTNAME = "drover@dispatcher-test"
PROBE, DONE = "drover-probe", "drover-done"  # not buffered: published at once, in order
# The first Celery release whose EventDispatcher.flush() keeps events appended during it.
UPSTREAM_FIX = (5, 7)


@pytest.fixture
def app(redis_srv: RedisServer) -> Celery:
    return make_app(Settings(redis_url=redis_srv.url))


class Received:
    """Events from Celery's EventReceiver, by type; `task-*` events by uuid."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.types: Counter[str] = Counter()
        self.uuids: Counter[str] = Counter()
        self.ready = threading.Event()
        self.done = threading.Event()

    def on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.types[event["type"]] += 1
            if event["type"].startswith("task-"):
                self.uuids[event["uuid"]] += 1
        if event["type"] == PROBE:
            self.ready.set()
        elif event["type"] == DONE:
            self.done.set()


@contextmanager
def receiving(app: Celery, received: Received | None = None) -> Iterator[Received]:
    """An event receiver in a thread (feeding `received`, a new one by default), subscribed
    (proved by a probe event) before yielding."""
    received = received if received is not None else Received()
    started = threading.Event()
    receiver: Any = None
    failure: list[BaseException] = []

    def run() -> None:
        nonlocal receiver
        try:
            with app.connection_for_read() as conn:
                receiver = app.events.Receiver(conn, handlers={"*": received.on_event})
                started.set()
                receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="event-receiver", daemon=True)
    thread.start()
    try:
        assert started.wait(RECEIVER_READY_S), "the receiver did not start"
        assert not failure, failure
        # Redis delivers events by PUBLISH: only a subscribed receiver gets them.
        with app.events.default_dispatcher(hostname=HOSTNAME) as probe:
            wait_for(
                lambda: probe.send(PROBE) or received.ready.wait(PROBE_INTERVAL_S),
                RECEIVER_READY_S,
                "the event receiver to subscribe",
            )
        yield received
    finally:
        if receiver is not None:
            receiver.should_stop = True
        thread.join(JOIN_S)
    assert not thread.is_alive(), "the receiver did not stop"
    assert not failure, failure


@contextmanager
def worker_dispatcher(
    app: Celery, on_send_buffered: Callable[[], None] | None = None
) -> Iterator[EventDispatcher]:
    """A dispatcher as the Events bootstep makes it when the worker has an event loop."""
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(
            conn,
            hostname=HOSTNAME,
            buffer_group=["task"],
            on_send_buffered=on_send_buffered,
        )
        try:
            yield dispatcher
        finally:
            dispatcher.close()


def finish(dispatcher: EventDispatcher, received: Received) -> None:
    """Flush, then wait for a marker sent after the flush on the same connection."""
    dispatcher.flush()
    dispatcher.send(DONE)
    assert received.done.wait(DELIVERED_S), "the marker event never arrived"


def test_drover_app_dispatches_events_with_celerys_own_dispatcher(app: Celery) -> None:
    """The worker's Events bootstep builds its dispatcher from `app.events.Dispatcher`: on a
    release with the upstream fix (celery/celery#10435, 5.7.0) that is Celery's own."""
    assert (celery.VERSION.major, celery.VERSION.minor) >= UPSTREAM_FIX, celery.__version__
    for celery_app in (app, config.celery.app):
        dispatcher_cls = celery_app.events.Dispatcher
        assert issubclass(dispatcher_cls, EventDispatcher), dispatcher_cls.__mro__
        assert dispatcher_cls.flush is EventDispatcher.flush, "not Celery's own flush()"


def test_no_task_event_is_lost_when_pool_threads_send_during_flushes(app: Celery) -> None:
    """Pool threads send while the event loop flushes: every event arrives exactly once."""
    flush_wanted = threading.Event()
    senders_done = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    with receiving(app) as received, worker_dispatcher(app, flush_wanted.set) as dispatcher:

        def event_loop() -> None:  # the worker's hub: flushes when a send asks it to
            while not senders_done.is_set():
                if flush_wanted.wait(PROBE_INTERVAL_S):
                    flush_wanted.clear()
                    dispatcher.flush()

        def pool_thread(n: int) -> None:
            for i in range(EVENTS_PER_THREAD):
                dispatcher.send("task-started", uuid=f"{n}-{i}")

        hub = threading.Thread(target=guarded(event_loop), name="hub")
        senders = [
            threading.Thread(target=guarded(partial(pool_thread, n)), name=f"pool-{n}")
            for n in range(SENDER_THREADS)
        ]
        hub.start()
        for t in senders:
            t.start()
        for t in senders:
            t.join(JOIN_S)
        senders_done.set()
        hub.join(JOIN_S)
        assert not any(t.is_alive() for t in [hub, *senders])
        assert not errors, errors
        finish(dispatcher, received)

    expected = {f"{n}-{i}" for n in range(SENDER_THREADS) for i in range(EVENTS_PER_THREAD)}
    missing = expected - set(received.uuids)
    sent = len(expected)
    assert not missing, f"{len(missing)} of {sent} task events lost, e.g. {sorted(missing)[:5]}"
    duplicated = {u: c for u, c in received.uuids.items() if c != 1}
    assert not duplicated, f"{len(duplicated)} task events delivered more than once"
    assert set(received.uuids) == expected


def test_an_event_sent_while_flush_publishes_goes_out_with_the_next_flush(
    app: Celery,
) -> None:
    """The interleaving of celery/celery#10434, made certain: a send during the socket write."""
    with receiving(app) as received, worker_dispatcher(app) as dispatcher:
        dispatcher.send("task-received", uuid="t1")
        publish = dispatcher.producer.publish

        def publish_while_a_pool_thread_sends(*args: Any, **kwargs: Any) -> Any:
            result = publish(*args, **kwargs)
            if dispatcher.producer.publish is publish_while_a_pool_thread_sends:
                dispatcher.producer.publish = publish  # once
                pool = threading.Thread(
                    target=lambda: dispatcher.send("task-started", uuid="t1"), name="pool-0"
                )
                pool.start()
                pool.join(JOIN_S)
            return result

        dispatcher.producer.publish = publish_while_a_pool_thread_sends
        dispatcher.flush()
        finish(dispatcher, received)

    assert received.types["task-received"] == 1
    assert received.types["task-started"] == 1, dict(received.types)


def test_a_batch_that_fails_to_publish_is_sent_by_the_next_flush(app: Celery) -> None:
    """Redis away during a flush: the batch is kept for later, not emptied (celery#10417)."""
    with receiving(app) as received, worker_dispatcher(app) as dispatcher:
        publish = dispatcher.producer.publish

        def redis_away(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("Redis is restarting")

        for uuid in ("a", "b", "c"):
            dispatcher.send("task-succeeded", uuid=uuid)
        dispatcher.producer.publish = redis_away
        dispatcher.flush()  # fails; buffer_while_offline keeps the batch for the next flush
        dispatcher.flush()  # fails again: the replayed batch must be kept again
        dispatcher.producer.publish = publish
        finish(dispatcher, received)

    assert received.uuids == Counter({"a": 1, "b": 1, "c": 1})
