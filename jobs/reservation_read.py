"""Memory reservations as Redis holds them, summed so that no booking adds room.

A host's reservations (jobs/keys.py `reservations_key`: job id -> MiB) are read by its
destination prepare, its worker's host report and every evacuation planner, and anyone with
the Redis password can write into them. drover itself books only a whole, non-negative
number of MiB (jobs/liveness.py `reserve`); anything else is unreadable, and must neither
crash its reader (every migration to the host would fail, and the host report with it) nor
give room back: `-1000000` would be a million MiB more than the host has.

An unreadable booking counts as the need its job recorded (the source's facts: what the
destination's prepare books) while that job lives, so the host is not over-committed by
the amount it stands for; when that cannot be known (no live job, no readable facts) it is
ignored, and said so. The registry's `memory_mib` caps the room whatever the bookings say
(worker/host_memory.py `room_mib`).

A reservations key that is not a hash at all (SET to a string, a list) books an unknown
amount: the host counts as having no room (nothing is placed there, worker/host_memory.py),
and that is said at each reading, never a Redis error that would fail every migration to
the host, its report and every evacuation's planning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

import redis

from config.events import get_logger
from jobs.keys import job_key, reservations_key
from jobs.record import JobNotFound, SourceFacts, parse_field
from jobs.record_read import SERVER_REFUSALS, KeyUnreadable, first_line, shared_key_read
from jobs.states import LIVE

# The largest booking read as one: an exbibyte (host facts use the same bound), far beyond
# any guest and small enough that a sum over a fleet stays an ordinary number.
MAX_RESERVATION_MIB = 1 << 40
_WHOLE_MIB = re.compile(r"[0-9]{1,16}")  # ASCII digits only: int() also takes "²", " 5", "1_0"
_LIVE_STATES = frozenset(state.value for state in LIVE)


# Book memory for a job only while it lives: a reservation written after the job's terminal
# transition (which frees reservations) would hold that memory for ever.
# KEYS[1] job hash, KEYS[2] reservations hash; ARGV[1] job id, ARGV[2] MiB, ARGV[3..] live states.
RESERVE_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state')
for i = 3, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""


def booking_mib(raw: str) -> int | None:
    """One booking as MiB, or None when it is not what drover writes."""
    if not _WHOLE_MIB.fullmatch(raw):
        return None
    mib = int(raw)
    return mib if mib <= MAX_RESERVATION_MIB else None


def reserved_total(
    r: redis.Redis, host: str, held: Mapping[str, str], *, excluding: str | None = None
) -> int:
    """The MiB booked on `host` by `held` (its reservations hash), but `excluding`'s own."""
    total, unreadable = 0, {}
    for job_id, raw in held.items():
        if job_id == excluding:
            continue
        mib = booking_mib(raw)
        if mib is None:
            unreadable[job_id] = raw
        else:
            total += mib
    if unreadable:
        total += _recorded_needs(r, host, unreadable)
    return total


def reserved_by_host(
    r: redis.Redis, hosts: list[str], *, excluding: str | None = None
) -> dict[str, int | str]:
    """Each host's booked MiB (`reserved_total`, but `excluding`'s own), in one round trip;
    in place of a number, why nothing can be placed there: its reservations key is not a
    hash (said here, once per reading)."""
    if not hosts:
        return {}
    with r.pipeline(transaction=False) as p:
        for host in hosts:
            p.hgetall(reservations_key(host))
        replies = p.execute(raise_on_error=False)
    found: dict[str, int | str] = {}
    for host, reply in zip(hosts, replies, strict=True):
        if isinstance(reply, redis.ResponseError):
            found[host] = _unreadable_key(r, host, reply)
        else:
            held = cast(dict[str, str], reply)
            found[host] = reserved_total(r, host, held, excluding=excluding)
    return found


def _unreadable_key(r: redis.Redis, host: str, refused: redis.ResponseError) -> str:
    """Why `host` has no room when Redis refused to read its reservations as a hash; a
    refusal of every command (a replica, the ACL) is the server's, raised as it came."""
    if isinstance(refused, SERVER_REFUSALS):
        raise refused
    key = reservations_key(host)
    try:
        with shared_key_read(r, key, "hash"):  # asked again, for the type it holds
            r.hgetall(key)
        problem = first_line(str(refused))
    except KeyUnreadable as exc:
        problem = str(exc)
    why = f"{problem}: what is booked on {host} cannot be known, so it counts as no room"
    get_logger().warning("record.unreadable", key=key, reason=why)
    return why


def _recorded_needs(r: redis.Redis, host: str, unreadable: dict[str, str]) -> int:
    """What the unreadable bookings stand for: each live job's recorded need, else nothing;
    one warning per booking and reading (a booking rewritten by hand is seen at once)."""
    with r.pipeline(transaction=False) as p:
        for job_id in unreadable:
            p.hmget(job_key(job_id), ["state", "facts"])
        found = cast(list[list[str | None]], p.execute())
    total = 0
    for (job_id, raw), (state, facts_raw) in zip(unreadable.items(), found, strict=True):
        need = _need_of(job_id, state, facts_raw)
        total += need or 0
        counted = f"counted as its job's recorded need, {need} MiB" if need else "ignored"
        # Looked up here, not at import: producers import this module (through the store)
        # and never log; structlog is a worker's (and costs a CLI its start-up).
        get_logger().warning(
            "record.unreadable",
            key=reservations_key(host),
            field=job_id,
            reason=f"the booking {raw[:32]!r} is not a whole number of MiB; {counted}",
        )
    return total


def _need_of(job_id: str, state: str | None, facts_raw: str | None) -> int | None:
    """The memory a live job's source recorded for its guest, when it can be read."""
    if state not in _LIVE_STATES:
        return None  # ended or gone: its bookings went with its terminal transition
    try:
        facts = parse_field(SourceFacts, job_id, "facts", facts_raw)
    except JobNotFound:  # MalformedRecord: nothing can be known of it
        return None
    if facts is None or facts.memory_mib < 0:
        return None
    return min(facts.memory_mib, MAX_RESERVATION_MIB)
