"""One holder at a time: a lease in Redis, taken with SET NX PX and renewed by its holder only.

Why: several copies of a process that must act once for the whole fleet (`drover exporter`,
whose fleet series Prometheus must see once however many copies it scrapes) run side by side
so that one can die without a gap. The one holding the lease acts; the others wait and take
it over once it lapses.

Safety: the lease holds a token of its holder's own (host, pid and a random part). Taking it
is `SET NX PX` (over a value no holder can have written, one with no time to live, too);
renewing is a compare-and-extend script, so a holder whose lease lapsed (a pause longer than
the time to live) can never renew one another holder has taken since.
The holder counts its lease from the moment it *sent* the command that took or renewed it,
so it believes itself the holder for no longer than Redis keeps the key: a lost reply or a
Redis that stopped answering makes it stand down at the end of that time, before anybody
else can take the lease.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import redis

MS_PER_S = 1000
TOKEN_RANDOM_BYTES = 6

# A value at a lease's key that no holder wrote is no holder: every holder sets a string with
# a time to live, so one without (PTTL -1), or of another type, was written by hand (anyone
# with the Redis password) and would otherwise keep every holder out for ever. It is cleared.
FREE_UNLESS_HELD_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and (kind ~= 'string' or redis.call('PTTL', KEYS[1]) == -1) then
  redis.call('DEL', KEYS[1])
end
"""
# KEYS[1] the lease; ARGV[1] the holder's token, ARGV[2] the time to live in ms.
# Takes a free lease or extends the caller's own; 1 when the caller holds it now, else 0.
_TAKE_OR_RENEW_LUA = (
    FREE_UNLESS_HELD_LUA
    + """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return 1
"""
)
# Compare-and-delete: a holder gives back only its own lease.
_RELEASE_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


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
        held = self._take_or_renew(keys=[self.key], args=[self.token, int(self.ttl_s * MS_PER_S)])
        self._held_until = sent + self.ttl_s if held == 1 else 0.0
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
