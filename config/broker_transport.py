"""kombu's Redis transports under drover, dropping a queue item that is not a message.

kombu reads each item a worker pops from its host's queue as JSON, then as a message (a dict
with properties and a body, base64 when it says so), before Celery or drover's checks
(config/message_checks.py) see anything. An item that fails there (`garbage`, `[]`, `null`, a
body that is not base64) raised out of the consumer's loop and stopped the worker: one
LPUSH by anyone with the Redis password ended a host's worker. Here such an item is logged
as a refused message and dropped (BRPOP has already taken it off the queue), and the worker
reads the next one. A worker's Celery app is given these classes as it starts
(`use_consumer_transport` in config/celery.py); producers and Flower keep kombu's own.
"""

from __future__ import annotations

import binascii
from typing import Any

from kombu.transport import redis as kombu_redis

from config.security import reject

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


class Channel(_DroppingMalformed, kombu_redis.Channel):  # type: ignore[misc]
    pass


class SentinelChannel(_DroppingMalformed, kombu_redis.SentinelChannel):  # type: ignore[misc]
    pass


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
