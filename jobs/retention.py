"""Retention: a finished record is forgotten `tunables.job_retention_days` after its end.

Ending a job or an evacuation (jobs/transition.py) runs `END_LUA` in the same MULTI as the
transition script, so no crash can leave a finished record without its time to live. It

- sets the retention on every key of the record that has none (jobs/keys.py `record_keys`:
  hash, events, history, phases, claims, tune requests, an evacuation's children, retries
  and reported marks; keys with a time to live of their own keep it),
- gives back the domain leases the record still holds (a lock key must never hold a
  finished job: the store's own release after the transition is then a no-op),
- files the record under its final state (`jobs_by_state_key`, scored by creation time),
- drops it from its producer's waiting count (`waiting_by_origin_key`),
- trims the listing indexes it is in (all records, its state, its hosts) of entries created
  more than the retention ago: sorted-set members cannot expire, and a record always ends
  after it was created, so an entry never outlives its record (jobs/listing.py also never
  reads past the retention, for hosts and states where nothing ended lately).

Anything written to a record's key after its end (a late event, a phase ended, a redelivered
claim) goes through `ADOPT_LUA` in the same step: a key it creates takes the record's
remaining time to live (or the whole retention when the record is gone), so nothing drover
writes for a job is left without one. A live record's keys (no time to live) stay as they are.
"""

from __future__ import annotations

from typing import Any

import redis

from jobs.connection import queue_script
from jobs.keys import (
    JOBS_BY_HOST_PREFIX,
    JOBS_BY_STATE_PREFIX,
    JOBS_INDEX,
    LEASE_FIELD_PREFIX,
    WAITING_BY_ORIGIN_PREFIX,
    job_key,
    record_keys,
)

SECONDS_PER_DAY = 86_400

# KEYS: `record_keys` (the hash first). ARGV[1] retention in seconds, ARGV[2] record id,
# ARGV[3] now (epoch seconds), ARGV[4] all-records index, ARGV[5] state-index prefix, ARGV[6]
# host-index prefix, ARGV[7] lease field prefix, ARGV[8] waiting-by-origin prefix, ARGV[9..]
# the kind's terminal states. Returns 1 when it applied the retention, 0 otherwise (live,
# gone, or already done).
# It runs after the transition has written the end, and Redis undoes nothing of a script that
# fails midway: every shared key it reads or writes is checked for the type drover gives it
# first (anyone with the Redis password can SET one to another), and one of another type is
# passed over as holding nothing of the record (a lock that is no string is no lease of it;
# an index that is no sorted set is neither filed into nor trimmed), so the end is whole:
# retention set, leases given back, the producer's count and the other indexes kept right,
# and the caller told of no error for an end that happened. The spoilt key is left as found.
END_LUA = """
local function is(key, want) return redis.call('TYPE', key)['ok'] == want end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local ended = false
for i = 9, #ARGV do if ARGV[i] == state then ended = true end end
if not ended or redis.call('TTL', KEYS[1]) ~= -1 then return 0 end
local ttl, id, t = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS do
  if redis.call('TTL', KEYS[i]) == -1 then redis.call('EXPIRE', KEYS[i], ttl) end
end
local lp = ARGV[7]
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #lp) == lp then
    local lock = string.sub(f, #lp + 1)
    if is(lock, 'string') and redis.call('GET', lock) == id then redis.call('DEL', lock) end
  end
end
local origin = redis.call('HGET', KEYS[1], 'origin')
local counted = origin and ARGV[8] .. origin
if counted and is(counted, 'set') then redis.call('SREM', counted, id) end
local all = is(ARGV[4], 'zset')
local score = all and redis.call('ZSCORE', ARGV[4], id) or t
local cutoff = '(' .. tostring(t - ttl)
local function trim(index)  -- an index of another type is left as found
  if is(index, 'zset') then redis.call('ZREMRANGEBYSCORE', index, '-inf', cutoff) end
end
local by_state = ARGV[5] .. state
if is(by_state, 'zset') or is(by_state, 'none') then redis.call('ZADD', by_state, score, id) end
trim(by_state)
trim(ARGV[4])
local raw = redis.call('HGET', KEYS[1], 'spec')
if raw then
  local ok, spec = pcall(cjson.decode, raw)
  if ok and type(spec) == 'table' then
    for _, field in ipairs({'src', 'dst', 'host'}) do  -- an evacuation has only a host
      if type(spec[field]) == 'string' then trim(ARGV[6] .. spec[field]) end
    end
  end
end
return 1
"""

# KEYS[1] the record's hash, KEYS[2..] keys just written; ARGV[1] retention in seconds.
# A written key without a time to live takes the record's (none while it lives).
ADOPT_LUA = """
local left = redis.call('PTTL', KEYS[1])
if left == -1 then return 0 end
if left == -2 then left = tonumber(ARGV[1]) * 1000 end
for i = 2, #KEYS do
  if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], left) end
end
return 1
"""


def retention_seconds(days: int) -> int:
    return days * SECONDS_PER_DAY


class Retention:
    """The two scripts above, for one store; `retention_s` comes from the settings."""

    def __init__(self, client: redis.Redis, retention_s: int) -> None:
        self.retention_s = retention_s
        self._end = client.register_script(END_LUA)
        self._adopt = client.register_script(ADOPT_LUA)

    def queue_end(self, pipe: Any, record_id: str, now_s: float, terminal: frozenset[str]) -> None:
        """Stack the end script on `pipe` (the transition's MULTI), after the transition."""
        args: list[str | float] = [
            self.retention_s,
            record_id,
            now_s,
            JOBS_INDEX,
            JOBS_BY_STATE_PREFIX,
            JOBS_BY_HOST_PREFIX,
            LEASE_FIELD_PREFIX,
            WAITING_BY_ORIGIN_PREFIX,
            *sorted(terminal),
        ]
        queue_script(pipe, self._end, record_keys(record_id), args)

    def queue_adopt(self, pipe: Any, record_id: str, *written: str) -> None:
        """Stack, after a write to `written` keys of the record, what gives them its TTL."""
        queue_script(pipe, self._adopt, [job_key(record_id), *written], [self.retention_s])
