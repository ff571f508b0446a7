"""The Lua scripts of the waiting lanes (jobs/lanes.py): each keeps a lane and its indexes
consistent in the one atomic step that changes them."""

# Shared by the scripts below: KEYS[1] the lane, KEYS[3] every lane, KEYS[4] ready lanes,
# KEYS[5] lane -> blocking gate, KEYS[6] gate -> limit; BLOCKED the blocked-set key prefix.
HELPERS = """
local function unblock(lane, blocked)
  local old = redis.call('HGET', KEYS[5], lane)
  if old then
    local bkey = blocked .. old
    redis.call('ZREM', bkey, lane)
    if redis.call('ZCARD', bkey) == 0 then redis.call('HDEL', KEYS[6], old) end
    redis.call('HDEL', KEYS[5], lane)
  end
end
local function next_head(lane, blocked)
  unblock(lane, blocked)
  local head = redis.call('ZRANGE', lane, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', KEYS[4], lane)
    redis.call('SREM', KEYS[3], lane)
    return ''
  end
  redis.call('ZADD', KEYS[4], head[2], lane)
  return head[1]
end
"""

# Line a job up. KEYS[1] lane, KEYS[2] job hash, KEYS[3..6] as above; ARGV[1] job id,
# ARGV[2] its creation time, ARGV[3] the lane field, ARGV[4] the blocked-set prefix.
LINE_UP_LUA = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('HSET', KEYS[2], ARGV[3], KEYS[1])
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local gate = redis.call('HGET', KEYS[5], KEYS[1])
if gate then
  redis.call('ZADD', ARGV[4] .. gate, 'XX', head[2], KEYS[1])
else
  redis.call('ZADD', KEYS[4], head[2], KEYS[1])
end
return 1
"""

# Take a job out of its lane without admitting it (it ended, its record is bad, ...).
# KEYS as for lining up; ARGV[1] job id, ARGV[2] the blocked-set prefix. Returns the new head.
DROP_LUA = (
    HELPERS
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
return next_head(KEYS[1], ARGV[2])
"""
)

# Admit a lane's head when every gate has room. KEYS[1] lane, KEYS[2] job hash, KEYS[3..6] as
# above, KEYS[7..] the gates; ARGV[1] job id, ARGV[2] time, ARGV[3] the queued state, ARGV[4]
# the job key prefix, ARGV[5] the gates field, ARGV[6] the blocked-set prefix, ARGV[7] the
# number n of terminal states, ARGV[8..7+n] those states, ARGV[8+n..] the gates' limits in
# KEYS order. Returns {1, '', next head} admitted, {0, gate, ''} refused by gate (the lane is
# now blocked on it), {-1, state, next head} not waiting any more (ended, aborted), {2, '',
# next head} admitted before: `admitted` and a slot in every gate (the field alone, written
# by hand, is no admission: such a job stays in line and is admitted in its turn).
ADMIT_LUA = (
    HELPERS
    + """
local lane, id, blocked = KEYS[1], ARGV[1], ARGV[6]
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= ARGV[3] or redis.call('HEXISTS', KEYS[2], 'abort_requested') == 1 then
  redis.call('ZREM', lane, id)
  return {-1, state or '', next_head(lane, blocked)}
end
local held = redis.call('HEXISTS', KEYS[2], 'admitted') == 1
for i = 7, #KEYS do
  if held and redis.call('SISMEMBER', KEYS[i], id) == 0 then held = false end
end
if held then
  redis.call('ZREM', lane, id)
  return {2, '', next_head(lane, blocked)}
end
local n = tonumber(ARGV[7])
local ended = {}
for i = 8, 7 + n do ended[ARGV[i]] = true end
for i = 7, #KEYS do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    local s = redis.call('HGET', ARGV[4] .. member, 'state')
    if (not s) or ended[s] then redis.call('SREM', KEYS[i], member) end
  end
  local limit = ARGV[1 + n + i]
  if redis.call('SCARD', KEYS[i]) >= tonumber(limit) then
    local head = redis.call('ZRANGE', lane, 0, 0, 'WITHSCORES')
    unblock(lane, blocked)
    redis.call('ZREM', KEYS[4], lane)
    if #head > 0 then
      redis.call('ZADD', blocked .. KEYS[i], head[2], lane)
      redis.call('HSET', KEYS[5], lane, KEYS[i])
      redis.call('HSET', KEYS[6], KEYS[i], limit)
    end
    return {0, KEYS[i], ''}
  end
end
local gates = {}
for i = 7, #KEYS do
  redis.call('SADD', KEYS[i], id)
  gates[#gates + 1] = KEYS[i]
end
redis.call('HSET', KEYS[2], 'admitted', ARGV[2], ARGV[5], table.concat(gates, ' '))
redis.call('HDEL', KEYS[2], 'waiting_for')
redis.call('ZREM', lane, id)
return {1, '', next_head(lane, blocked)}
"""
)

# Every lane's head. KEYS[1..4] = KEYS[3..6] of the scripts above (every lane, ready lanes,
# lane -> blocking gate, gate -> limit); ARGV[1] the blocked-set prefix. Returns a flat list
# of lane, head, creation time, the gate it is blocked on ('' for none). A gate no lane is
# blocked on leaves gate -> limit (an entry a crash, or a Redis writer, left there).
EVERY_HEAD_LUA = """
local found = {}
for _, lane in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local head = redis.call('ZRANGE', lane, 0, 0, 'WITHSCORES')
  local gate = redis.call('HGET', KEYS[3], lane)
  if #head == 0 then
    if gate then
      redis.call('ZREM', ARGV[1] .. gate, lane)
      if redis.call('ZCARD', ARGV[1] .. gate) == 0 then redis.call('HDEL', KEYS[4], gate) end
      redis.call('HDEL', KEYS[3], lane)
    end
    redis.call('ZREM', KEYS[2], lane)
    redis.call('SREM', KEYS[1], lane)
  else
    if not gate and not redis.call('ZSCORE', KEYS[2], lane) then
      redis.call('ZADD', KEYS[2], head[2], lane)
    end
    found[#found + 1] = lane
    found[#found + 1] = head[1]
    found[#found + 1] = head[2]
    found[#found + 1] = gate or ''
  end
end
for _, gate in ipairs(redis.call('HKEYS', KEYS[4])) do
  if redis.call('ZCARD', ARGV[1] .. gate) == 0 then redis.call('HDEL', KEYS[4], gate) end
end
return found
"""

# Slots held by jobs that ended or vanished without giving them back (a crash, a record
# deleted by hand) leave their gates. KEYS the gates; ARGV[1] the job key prefix, ARGV[2..]
# the terminal states.
PRUNE_LUA = """
local ended = {}
for i = 2, #ARGV do ended[ARGV[i]] = true end
for _, gate in ipairs(KEYS) do
  for _, member in ipairs(redis.call('SMEMBERS', gate)) do
    local s = redis.call('HGET', ARGV[1] .. member, 'state')
    if (not s) or ended[s] then redis.call('SREM', gate, member) end
  end
end
return 1
"""
