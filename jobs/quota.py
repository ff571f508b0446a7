"""The optional quota of waiting jobs per producer: `[cluster] max_waiting_per_producer`.

Off unless the config sets it. A producer's submit (its `origin`, producer/hosts.py
producer_name) is refused, with one line and nothing left recorded, while that many of its
jobs still wait for admission. An evacuation's children are not counted: they come from the
evacuation's worker, are bounded by its `--max-parallel` and the host's domains, and refusing
one half-way would leave the evacuation partial for no reason but the count.

The count is a set per producer (jobs/keys.py waiting_by_origin_key). Admission need not know
it: the check prunes the jobs that no longer wait (admitted, ended, gone) and takes the new
job's place in the same Lua step, so two submits of one producer cannot both take the last
place. A job's end also drops it (jobs/retention.py).
"""

from __future__ import annotations

from typing import cast

import redis

from jobs.keys import job_key, waiting_by_origin_key
from jobs.states import JobState

# KEYS[1] the producer's set; ARGV[1] job id, ARGV[2] limit, ARGV[3] job key prefix,
# ARGV[4] the queued state. Returns 1 (place taken) or 0 (the quota is full).
_TAKE_PLACE_LUA = """
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if other ~= ARGV[1] then
    local f = redis.call('HMGET', ARGV[3] .. other, 'state', 'admitted')
    if f[1] ~= ARGV[4] or f[2] then redis.call('SREM', KEYS[1], other) end
  end
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


class QuotaFull(Exception):
    """The producer has as many waiting jobs as its quota allows; the message is one line."""


def take_place(r: redis.Redis, origin: str, job_id: str, limit: int) -> None:
    """Count `job_id` (recorded, not yet in line) among `origin`'s waiting jobs, or raise
    QuotaFull when `limit` of them already wait."""
    script = r.register_script(_TAKE_PLACE_LUA)
    taken = cast(
        int,
        script(
            keys=[waiting_by_origin_key(origin)],
            args=[job_id, limit, job_key(""), JobState.QUEUED.value],
        ),
    )
    if not taken:
        raise QuotaFull(
            f"{origin} already has {limit} jobs waiting for a slot ([cluster] "
            "max_waiting_per_producer); submit more once some have started"
        )
