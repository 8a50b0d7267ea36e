-- Cancel a task: a waiting one ends CANCELLED at once; a running one is flagged and its
-- worker is told on the queue's cancel channel.
-- KEYS: task hash, ready, delayed
-- ARGV: prefix, id, result_ttl_ms, cancel channel, reason
-- Returns the state the task was in, or nil when it is unknown.
local h, ready, delayed = KEYS[1], KEYS[2], KEYS[3]
local prefix, id, result_ttl_ms, channel, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local f = redis.call('HMGET', h, 'state', 'attempt')
local state = f[1]
if not state then
  return nil
end
if state == 'queued' or state == 'scheduled' then
  redis.call('ZREM', state == 'queued' and ready or delayed, id)
  local outcome = outcome_json(id, 'cancelled', f[2], {kind = 'cancelled', reason = reason})
  finish(prefix, h, 'cancelled', outcome, result_ttl_ms)
elseif state == 'running' then
  redis.call('HSET', h, 'cancel', '1')
  redis.call('PUBLISH', channel, id)
end
return state
