"""One holder at a time: a lease in Redis, taken with SET NX PX and renewed by its holder only.

Why: several copies of a process that must act once for the whole fleet (`drover exporter`,
whose fleet series Prometheus must see once however many copies it scrapes) run side by side
so that one can die without a gap. The one holding the lease acts; the others wait and take
it over once it lapses.

Safety: the lease holds a token of its holder's own (host, pid and a random part). Taking it
is `SET NX PX` (over a value no holder can have written: one with no time to live, or longer
to live than drover ever gives that lease, or not a string, said as `lease.hand_written`);
renewing is a compare-and-extend script, so a holder whose lease lapsed (a pause longer than
the time to live) can never renew one another holder has taken since.
The holder counts its lease from the moment it *sent* the command that took or renewed it,
so it believes itself the holder for no longer than Redis keeps the key: a lost reply or a
Redis that stopped answering makes it stand down at the end of that time, before anybody
else can take the lease.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Any, cast

import redis

from config.events import get_logger
from config.tunables import Tunables
from jobs.keys import EXPORTER_LEASE, SAFETY_PASS, SCHEDULE_LOCK

MS_PER_S = 1000
TOKEN_RANDOM_BYTES = 6

# A lease drover holds lives at most this long (the upper bound of its tunable, or the beat
# lock redbeat renews to a fixed time: schedules/beat.py BEAT_LOCK_TIMEOUT_S, which must not
# exceed SCHEDULE_LOCK_TTL_S); one with longer to live was written by hand.
SCHEDULE_LOCK_TTL_S = 60.0
# Slack over that bound (a holder's clock, a renewal in flight): a lease with more than its
# longest time to live plus this left holds nothing.
HAND_WRITTEN_MARGIN_S = 5.0


def _upper_bound_s(tunable: str) -> float:
    """The largest value config/tunables.py accepts for `tunable` (its `le`)."""
    for rule in Tunables.model_fields[tunable].metadata:
        bound = getattr(rule, "le", None)
        if isinstance(bound, int | float):
            return float(bound)
    raise ValueError(f"{tunable} has no upper bound")  # pragma: no cover (a tunable's rule)


LONGEST_HOLD_S: dict[str, float] = {
    EXPORTER_LEASE: _upper_bound_s("exporter_lease_ttl"),
    SAFETY_PASS: _upper_bound_s("admission_safety_interval"),
    SCHEDULE_LOCK: SCHEDULE_LOCK_TTL_S,
}


def _longest_ms_table() -> str:
    """LONGEST_HOLD_S (plus the margin) as a Lua table, key -> ms."""
    rows = (
        f"[{json.dumps(key)}] = {int((s + HAND_WRITTEN_MARGIN_S) * MS_PER_S)}"
        for key, s in sorted(LONGEST_HOLD_S.items())
    )
    return "{" + ", ".join(rows) + "}"


# A value at a lease's key that no holder wrote is no holder: every holder sets a string with
# a time to live no longer than LONGEST_HOLD_S, so one without (PTTL -1), with longer to live
# (a `PX` of a year), or of another type, was written by hand (anyone with the Redis
# password) and would otherwise keep every holder out for ever, or for that year. It is
# cleared; `freed` says what it was ('' when nothing was cleared), for a caller to say.
FREE_UNLESS_HELD_LUA = f"""
local longest = ({_longest_ms_table()})[KEYS[1]]
local kind = redis.call('TYPE', KEYS[1])['ok']
local freed = ''
if kind ~= 'none' then
  local ttl = redis.call('PTTL', KEYS[1])
  if kind ~= 'string' or ttl == -1 or (longest and ttl > longest) then
    freed = kind .. ' ' .. ttl
    redis.call('DEL', KEYS[1])
  end
end
"""
# KEYS[1] the lease; ARGV[1] the holder's token, ARGV[2] the time to live in ms.
# Takes a free lease or extends the caller's own: {1 when the caller holds it now else 0,
# what was cleared as no holder's ('' for nothing)}.
_TAKE_OR_RENEW_LUA = (
    FREE_UNLESS_HELD_LUA
    + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, freed}
end
if holder then return {0, freed} end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return {1, freed}
"""
)
# Compare-and-delete: a holder gives back only its own lease.
_RELEASE_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def say_freed(key: str, freed: str) -> None:
    """One line for a lease cleared as no holder's (`freed`: its type and PTTL, as the
    script saw them); said once, as the value is gone after."""
    kind, _, ttl = freed.partition(" ")
    if kind != "string":
        what = f"a {kind}, not a string"
    elif ttl == "-1":
        what = "a string with no time to live"
    else:
        longest = LONGEST_HOLD_S.get(key, 0.0) + HAND_WRITTEN_MARGIN_S
        what = f"a string with {int(ttl) // MS_PER_S} s to live, more than drover's {longest:g} s"
    log = get_logger()  # looked up here, not at import: producers import this module
    log.warning(
        "lease.hand_written", key=key, reason=f"{key} held {what}: no holder's; taken as free"
    )


def new_token() -> str:
    """A holder's token: who it is for people (`GET` the key), unique for the script."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(TOKEN_RANDOM_BYTES)}"


class Lease:
    """The lease `key` for one holder; `renew()` on a timer shorter than `ttl_s`."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float, token: str = "") -> None:
        self.r = client
        self.key = key
        self.ttl_s = ttl_s
        self.token = token or new_token()
        self._take_or_renew = client.register_script(_TAKE_OR_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._held_until = 0.0  # time.monotonic() until which the lease is surely ours

    def renew(self) -> bool:
        """Take the lease if it is free, extend it if it is ours; True while we hold it.

        A Redis error leaves what we knew: held until the last successful renewal's time
        to live runs out (the error is raised for the caller to report)."""
        sent = time.monotonic()
        held, freed = cast(
            list[Any],
            self._take_or_renew(keys=[self.key], args=[self.token, int(self.ttl_s * MS_PER_S)]),
        )
        self._held_until = sent + self.ttl_s if int(held) == 1 else 0.0
        if freed:
            say_freed(self.key, str(freed))
        return self.held()

    def held(self) -> bool:
        """True while the lease is surely ours (no Redis call)."""
        return time.monotonic() < self._held_until

    def release(self) -> None:
        """Give the lease back now (a standby takes it at its next try), if it is ours."""
        self._held_until = 0.0
        self._release(keys=[self.key], args=[self.token])

    def holder(self) -> str | None:
        """The token of whoever holds the lease now (for people and tests)."""
        value = self.r.get(self.key)
        return None if value is None else str(value)
