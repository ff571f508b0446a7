"""kombu's Redis transports under drover, dropping a queue item that is not a message.

kombu reads each item a worker pops from its host's queue as JSON, then as a message (a dict
with properties and a body, base64 when it says so), before Celery or drover's checks
(config/message_checks.py) see anything. An item that fails there (`garbage`, `[]`, `null`, a
body that is not base64) raised out of the consumer's loop and stopped the worker: one
LPUSH by anyone with the Redis password ended a host's worker. Here such an item is logged
as a refused message and dropped (BRPOP has already taken it off the queue), and the worker
reads the next one.

kombu also trusts what it reads back at start and in its timers. Its restore of messages a
dead consumer left unacknowledged (at every start, reconnect and about every 100 s) loads each
stale `unacked` entry as JSON: one junk entry (`HSET unacked x junk` plus its index) raised
out of the start and ended every worker that (re)started, logged a traceback per restore, was
never removed, and held up the real entries behind it. A junk member of a binding set broke
the routing of every message to that exchange; a lock `unacked_mutex` without expiry (or a
key of another type in place of `unacked`/`unacked_index`) stopped the restore for good. Here
each is removed and said once (`message.rejected`), and the real entries are restored.

A worker's Celery app is given these classes as it starts (`use_consumer_transport` in
config/celery.py); producers and Flower keep kombu's own.
"""

from __future__ import annotations

import binascii
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from config.security import excerpt, reject

# What a malformed item raises inside kombu's read: bad JSON or text (ValueError), a payload
# of the wrong shape (TypeError, KeyError, AttributeError), a body that is not base64.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, binascii.Error)


class _DroppingMalformed:
    """The read of one popped queue item, with a malformed one refused instead of raised."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[misc]
        except MALFORMED as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            reject(f"not a message, dropped from the queue: {type(exc).__name__}: {text}"[:200])
            return True  # an item was taken (and dropped): the poller goes on


def unacked_problem(raw: bytes) -> tuple[str | None, list[Any]]:
    """Why an `unacked` entry is not what kombu's QoS.append writes (None: it is), and the
    entry: JSON `[message, exchange, routing_key]`, the message a dict with a body, its
    headers a dict and its properties a dict holding a delivery_info dict (kombu's restore
    writes into both and stops at nothing else)."""
    try:
        entry = loads(bytes_to_str(raw))
    except (*MALFORMED, RecursionError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}"[:200], []
    if not (isinstance(entry, list) and len(entry) == 3):
        return "not a [message, exchange, routing_key] triple", []
    message, exchange, routing_key = entry
    if not (isinstance(exchange, str) and isinstance(routing_key, str)):
        return "exchange or routing key is not a string", []
    if not (isinstance(message, dict) and "body" in message):
        return "message is not a dict with a body", []
    properties = message.get("properties")
    if not (
        isinstance(message.get("headers"), dict)
        and isinstance(properties, dict)
        and isinstance(properties.get("delivery_info"), dict)
    ):
        return "message headers or properties are not kombu's", []
    return None, entry


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's ack emulation, restoring only entries it wrote and removing any other."""

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        problems: list[str] = []

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(self.unacked_key, tag)
            problem, entry = unacked_problem(raw) if raw else (None, [])
            problems[:] = [problem] if problem else []
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if entry:
                self.channel._do_restore_message(*entry, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)
        for problem in problems:  # said after the transaction: a retried WATCH says it once
            reject(f"not an unacknowledged message, removed: {problem}", tag=_text(tag))

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> Any:
        if not (self._vrestore_count % (interval or 1)):  # kombu's throttle: a scan is due
            self._remove_foreign_keys()
        return super().restore_visible(start=start, num=num, interval=interval)

    def _remove_foreign_keys(self) -> None:
        """Delete a key kombu's restore needs that kombu did not write: `unacked` or
        `unacked_index` of another type (WRONGTYPE in every restore and ack), a lock
        `unacked_mutex` without expiry or with more than kombu gives it (no restore ever)."""
        keys = (self.unacked_key, self.unacked_index_key, self.unacked_mutex_key)
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            unacked, index, _ = pipe.type(keys[0]).type(keys[1]).type(keys[2]).execute()
            ttl = client.pttl(keys[2])
            foreign = [
                (keys[0], bytes_to_str(unacked) not in ("hash", "none"), "not a hash"),
                (keys[1], bytes_to_str(index) not in ("zset", "none"), "not a sorted set"),
                (
                    keys[2],
                    ttl == -1 or ttl > self.unacked_mutex_expire * 1000,
                    "a lock without kombu's expiry",
                ),
            ]
            for key, is_foreign, what in foreign:
                if is_foreign:
                    client.delete(key)
                    reject(f"{key} is {what}, removed", key=key)


def _text(value: Any) -> str:
    try:
        return excerpt(bytes_to_str(value))
    except UnicodeDecodeError:
        return excerpt(value)


class _CheckedBindings:
    """A binding table with every member kombu would not have written removed."""

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        key = self.keyprefix_queue % exchange  # type: ignore[attr-defined]
        table: list[tuple[str, ...]] = []
        junk: list[bytes] = []
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            for value in client.smembers(key):
                try:
                    parts = tuple(bytes_to_str(value).split(self.sep))  # type: ignore[attr-defined]
                except UnicodeDecodeError:
                    parts = ()
                if len(parts) == 3:
                    table.append(parts)
                else:
                    junk.append(value)
            if junk:
                client.srem(key, *junk)  # exactly the members read: a real one is never hit
        for member in junk:
            reject(f"not a binding of {exchange}, removed", member=_text(member))
        return table


class Channel(_DroppingMalformed, _CheckedBindings, kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS


class SentinelChannel(_DroppingMalformed, _CheckedBindings, kombu_redis.SentinelChannel):  # type: ignore[misc]
    QoS = QoS


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
