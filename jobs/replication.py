"""The write-loss guard of a Sentinel set: WAIT for a replica after the writes that matter.

Why: Redis replicates asynchronously, so a primary killed (kill -9, a host lost) takes the
writes its replica had not received yet, and Sentinel promotes the replica without them.
Three writes must not vanish that way: a job's creation (the producer told its caller the
job exists), a phase claim (the guard against running a phase twice: a claim lost with the
BRPOP that took the message would let the message come back and the phase run again), and a
state transition (a terminal state lost would leave a finished job looking live). After
each, the store sends WAIT: the call returns once `replicas` replicas hold every write made
on that connection so far (the replication stream is ordered, so earlier writes of other
connections, a message taken from a queue, are covered too), or after `timeout_ms`.

A WAIT that times out does not undo the write nor fail the caller: the primary has it, and
with the replica away there is nothing to wait for (refusing every write until a replica is
back would stop the fleet, which is what `min-replicas-to-write` does; docs/sentinel.md).
The phase a lost claim would let run again is still refused on the host that ran it, by
its own ledger (worker/ledger.py): a phase only runs on the host that owns it.

Nor does a WAIT that reaches a replica: in a failover a sentinel that has not heard of the
promotion yet still names the old primary, now a replica, and a connection made then lands
there. A write on it fails READONLY, which redis-py turns into a reconnect; a WAIT there
fails with a plain error that nothing caught, and it failed the phase that had just written
its state on the real master. It counts as not acknowledged, and the idle connections are
dropped so the next command asks the sentinels again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis

# How Redis refuses a WAIT sent to a replica ("WAIT cannot be used with replica instances").
REPLICA_REFUSAL = "replica"


@dataclass(frozen=True)
class ReplicaWait:
    """How many replicas must acknowledge (0: a single server, no WAIT) and for how long."""

    replicas: int = 0
    timeout_ms: int = 0

    def __call__(self, client: redis.Redis) -> bool:
        """True once the writes made so far on `client` are on `replicas` replicas."""
        if self.replicas <= 0:
            return True
        try:
            acknowledged = cast(int, client.wait(self.replicas, self.timeout_ms))
        except redis.ResponseError as error:
            if REPLICA_REFUSAL not in str(error).lower():
                raise
            client.connection_pool.disconnect(inuse_connections=False)
            return False
        return acknowledged >= self.replicas


NO_WAIT = ReplicaWait()
