-- Accept a task: ready now (ZADD ready by packed score) or later (ZADD delayed by due time).
-- KEYS: task hash, ready, delayed, unique key (or the task hash again when not unique)
-- ARGV: prefix, id, body, priority, due_ms ('' = now), now_ms, reply, max_attempts,
--       unique_ttl_ms ('' = no unique key)
-- Returns {1, id, state} when accepted, {0, existing_id, state} for a duplicate.
local h, ready, delayed, unique = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, id, body, priority, due, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local reply, max_attempts, unique_ttl = ARGV[7], ARGV[8], ARGV[9]

if unique_ttl ~= '' then
  local existing = redis.call('GET', unique)
  if existing then
    local state = redis.call('HGET', task_key(prefix, existing), 'state')
    if state then
      return {0, existing, state}
    end
  end
end
local current = redis.call('HGET', h, 'state')
if current then
  return {0, id, current} -- the same id twice: a producer retrying after a lost reply
end

local fields = {'body', body, 'prio', priority, 'attempt', 0, 'max', max_attempts}
if reply ~= '' then
  fields[#fields + 1] = 'reply'
  fields[#fields + 1] = reply
end
local state
if due ~= '' and tonumber(due) > tonumber(now) then
  state = 'scheduled'
  redis.call('ZADD', delayed, due, id)
  redis.call('HSET', h, 'state', state, unpack(fields))
else
  state = 'queued'
  local score = ready_score(prefix, priority)
  redis.call('ZADD', ready, score, id)
  redis.call('HSET', h, 'state', state, 'score', score, 'rt', now, unpack(fields))
end
redis.call('HINCRBY', prefix .. 'stats', 'enqueued', 1)
if unique_ttl ~= '' then
  redis.call('SET', unique, id, 'PX', unique_ttl)
end
wake(prefix)
return {1, id, state}
