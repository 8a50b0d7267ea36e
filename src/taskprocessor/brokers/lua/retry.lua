-- Schedule a reserved task's next attempt (or hand it back unstarted, keeping its place).
-- KEYS: task hash, leases, ready, delayed
-- ARGV: prefix, id, token, attempt ('' = keep: a release), due_ms ('' = now), now_ms
-- Returns {1, state} when done, {0, state} when the token is stale.
local h, leases, ready, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, id, token, attempt, due, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local f = redis.call('HMGET', h, 'state', 'token')
if f[1] ~= 'running' or f[2] ~= token then
  return {0, f[1] or ''}
end
redis.call('ZREM', leases, id)
redis.call('HDEL', h, 'token')
release_limits(prefix, h, attempt == '') -- a release never started: its tokens go back
if attempt == '' then
  -- release: back to the exact position it was popped from
  redis.call('ZADD', ready, redis.call('HGET', h, 'score'), id)
  redis.call('HSET', h, 'state', 'queued')
  wake(prefix)
  return {1, 'queued'}
end
redis.call('HSET', h, 'attempt', attempt)
if due ~= '' and tonumber(due) > tonumber(now) then
  redis.call('ZADD', delayed, due, id)
  redis.call('HSET', h, 'state', 'scheduled')
  redis.call('HDEL', h, 'score')
  wake(prefix) -- idle workers learn the new earliest due time
  return {1, 'scheduled'}
end
local score = ready_score(prefix, redis.call('HGET', h, 'prio') or 50)
redis.call('ZADD', ready, score, id)
redis.call('HSET', h, 'state', 'queued', 'score', score, 'rt', now)
wake(prefix)
return {1, 'queued'}
