"""Memory reservations as Redis holds them, summed so that no booking adds room.

A host's reservations (jobs/keys.py `reservations_key`: job id -> MiB) are read by its
destination prepare, its worker's host report and every evacuation planner, and anyone with
the Redis password can write into them. drover itself books only a whole, non-negative
number of MiB (jobs/liveness.py `reserve`); anything else is unreadable, and must neither
crash its reader (every migration to the host would fail, and the host report with it) nor
give room back: `-1000000` would be a million MiB more than the host has.

A booking counts only for a live job whose spec sends it to this host: one written by hand
under any other name (`HSET ... deadbeef0000 1000000`) would otherwise block the host for
good, as no job's end would ever remove it. The bookings' job records are read in one
pipeline; the bookings that do not count are said once per host and reading
(`reservation.ignored`), and those of a job that has ended or does not exist are removed:
drover books only for a live job whose record it wrote first (`RESERVE_LUA`), and a job's end
removes its bookings in the same step (jobs/transition.py), so none of them is drover's, and
an ended job never lives again (jobs/states.py). A live job's booking is never removed here.

An unreadable booking of such a job counts as the need its job recorded (the source's
facts: what the destination's prepare books), so the host is not over-committed by the
amount it stands for; when that cannot be known (no readable facts) it is ignored, and said
so. The registry's `memory_mib` caps the room whatever the bookings say
(worker/host_memory.py `room_mib`).

A reservations key that is not a hash at all (SET to a string, a list) books an unknown
amount: the host counts as having no room (nothing is placed there, worker/host_memory.py),
and that is said at each reading, never a Redis error that would fail every migration to
the host, its report and every evacuation's planning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from config.addresses import shown
from config.events import get_logger
from jobs.keys import job_key, reservations_key
from jobs.record import JobNotFound, SourceFacts, parse_field
from jobs.record_read import SERVER_REFUSALS, KeyUnreadable, first_line, shared_key_read
from jobs.states import LIVE, TERMINAL

# The largest booking read as one: an exbibyte (host facts use the same bound), far beyond
# any guest and small enough that a sum over a fleet stays an ordinary number.
MAX_RESERVATION_MIB = 1 << 40
_WHOLE_MIB = re.compile(r"[0-9]{1,16}")  # ASCII digits only: int() also takes "²", " 5", "1_0"
_LIVE_STATES = frozenset(state.value for state in LIVE)
_ENDED_STATES = frozenset(state.value for state in TERMINAL)
_JOB_FIELDS = ["state", "spec", "facts"]
SHOWN = 3  # uncounted bookings named in the one line said per host and reading


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
    return _totals(r, {host: held}, excluding)[host]


def reserved_by_host(
    r: redis.Redis, hosts: list[str], *, excluding: str | None = None
) -> dict[str, int | str]:
    """Each host's booked MiB (`reserved_total`, but `excluding`'s own), in one round trip
    for the hashes and one for their jobs' records; in place of a number, why nothing can
    be placed there: its reservations key is not a hash (said here, once per reading)."""
    if not hosts:
        return {}
    with r.pipeline(transaction=False) as p:
        for host in hosts:
            p.hgetall(reservations_key(host))
        replies = p.execute(raise_on_error=False)
    found: dict[str, int | str] = {}
    readable: dict[str, Mapping[str, str]] = {}
    for host, reply in zip(hosts, replies, strict=True):
        if isinstance(reply, redis.ResponseError):
            found[host] = _unreadable_key(r, host, reply)
        else:
            readable[host] = cast(dict[str, str], reply)
    found.update(_totals(r, readable, excluding))
    return {host: found[host] for host in hosts}


@dataclass
class _Reading:
    """One host's bookings as their jobs' records judge them."""

    total: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # job id -> why not counted
    ended: list[str] = field(default_factory=list)  # of those, the ones to remove


def _totals(
    r: redis.Redis, held_by_host: Mapping[str, Mapping[str, str]], excluding: str | None
) -> dict[str, int]:
    """Each host's total: only bookings of a live job whose spec sends it there count (the
    jobs' records read in one pipeline); the others are said once per host and reading, and
    those of an ended or missing job removed."""
    asked = [
        (host, job_id, raw)
        for host, held in held_by_host.items()
        for job_id, raw in held.items()
        if job_id != excluding
    ]
    records: list[Any] = []
    if asked:
        with r.pipeline(transaction=False) as p:
            for _, job_id, _ in asked:
                p.hmget(job_key(job_id), _JOB_FIELDS)
            records = p.execute(raise_on_error=False)
    readings = {host: _Reading() for host in held_by_host}
    for (host, job_id, raw), record in zip(asked, records, strict=True):
        reading = readings[host]
        verdict = _judged(r, host, job_id, raw, record)
        if isinstance(verdict, int):
            reading.total += verdict
            continue
        why, ended = verdict
        reading.ignored[job_id] = why
        if ended:
            reading.ended.append(job_id)
    _prune(r, readings)
    return {host: reading.total for host, reading in readings.items()}


def _judged(
    r: redis.Redis, host: str, job_id: str, raw: str, record: object
) -> int | tuple[str, bool]:
    """The MiB one booking counts for; else why it does not, and whether its job has ended
    (or never was, or its record is no hash): drover books only for a live job of its own
    (`RESERVE_LUA`, after the record is written), and a job's end removes its bookings, so
    such a booking is never drover's and can go. A live job's booking is never removed here."""
    if isinstance(record, redis.ResponseError):
        if isinstance(record, SERVER_REFUSALS):
            raise record
        return f"its job's record cannot be read ({first_line(str(record))[:80]})", True
    state, spec_raw, facts_raw = cast(list[str | None], record)
    if state is None:
        return "no such job", True
    if state in _ENDED_STATES:
        return f"its job has ended ({state})", True
    if state not in _LIVE_STATES:
        return f"its job's state {shown(state)} is not drover's", False
    dst = _destination(spec_raw)
    if dst != host:
        goes = "an unreadable spec" if dst is None else f"its spec sends it to {shown(dst)}"
        return f"its job has {goes}, not {host}", False
    mib = booking_mib(raw)
    if mib is not None:
        return mib
    need = _need_of(job_id, facts_raw)
    counted = f"counted as its job's recorded need, {need} MiB" if need else "ignored"
    # Looked up here, not at import: producers import this module (through the store)
    # and never log; structlog is a worker's (and costs a CLI its start-up).
    get_logger().warning(
        "record.unreadable",
        key=reservations_key(host),
        field=job_id,
        reason=f"the booking {raw[:32]!r} is not a whole number of MiB; {counted}",
    )
    return need or 0


def _destination(spec_raw: str | None) -> str | None:
    """The `dst` of a job's spec as its record holds it (the signed spec: a worker refuses
    the job at its next step when the two differ, jobs/request_signing.py)."""
    try:
        spec = json.loads(spec_raw or "")
    except ValueError:
        return None
    dst = spec.get("dst") if isinstance(spec, dict) else None
    return dst if isinstance(dst, str) else None


def _prune(r: redis.Redis, readings: Mapping[str, _Reading]) -> None:
    """Say each host's uncounted bookings in one line, and remove those of ended or missing
    jobs (a key turned to another type meanwhile keeps them: the reply is not read)."""
    with r.pipeline(transaction=False) as p:
        for host, reading in readings.items():
            if reading.ended:
                p.hdel(reservations_key(host), *reading.ended)
        if len(p):
            p.execute(raise_on_error=False)
    log = get_logger()  # here, not at import: producers import this module and never log
    for host, reading in readings.items():
        if not reading.ignored:
            continue
        some = "; ".join(
            f"{shown(job_id)}: {why}" for job_id, why in list(reading.ignored.items())[:SHOWN]
        )
        more = len(reading.ignored) - SHOWN
        log.warning(
            "reservation.ignored",
            key=reservations_key(host),
            ignored=len(reading.ignored),
            removed=len(reading.ended),
            reason=some + (f"; and {more} more" if more > 0 else ""),
        )


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


def _need_of(job_id: str, facts_raw: str | None) -> int | None:
    """The memory a live job's source recorded for its guest, when it can be read."""
    try:
        facts = parse_field(SourceFacts, job_id, "facts", facts_raw)
    except JobNotFound:  # MalformedRecord: nothing can be known of it
        return None
    if facts is None or facts.memory_mib < 0:
        return None
    return min(facts.memory_mib, MAX_RESERVATION_MIB)
