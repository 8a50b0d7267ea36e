-- Cancel a task: a waiting one ends CANCELLED at once; a running one is flagged and its
-- worker is told on the queue's cancel channel.
-- KEYS: ready, delayed
-- ARGV: prefix, id, result_ttl_ms, cancel channel, reason
-- Returns the state the task was in, or nil when it is unknown.
local ready, delayed = KEYS[1], KEYS[2]
local prefix, id, result_ttl_ms, channel, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local state = state_of(id)
if not state then
  return nil
end
if state == 'queued' or state == 'scheduled' then
  redis.call('ZREM', state == 'queued' and ready or delayed, id)
  local outcome = outcome_json(id, 'cancelled', record(id).attempt, {kind = 'cancelled', reason = reason})
  finish(prefix, id, outcome, result_ttl_ms)
elseif state == 'running' then
  local r = record(id) or {}
  r.cancel = '1'
  save(id, r)
  redis.call('PUBLISH', channel, id)
end
flush()
return state
