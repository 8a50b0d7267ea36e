-- Schedule a reserved task's next attempt (or hand it back unstarted, keeping its place).
-- KEYS: leases, ready, delayed
-- ARGV: prefix, id, token, attempt ('' = keep: a release), due_ms ('' = now), now_ms
-- Returns {1, state} when done, {0, state} when the token is stale.
local leases, ready, delayed = KEYS[1], KEYS[2], KEYS[3]
local prefix, id, token, attempt, due, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

local held, lease = lease_of(id)
local r = held == token and record(id)
if not r then
  return {0, state_of(id) or ''}
end
redis.call('ZREM', leases, id)
put(RUNS, id, false)
release_limits(prefix, lease, attempt == '') -- a release never started: its tokens go back
if attempt == '' then
  -- release: back to the exact position it was popped from
  redis.call('ZADD', ready, r.score, id)
  r.state = 'queued'
elseif due ~= '' and tonumber(due) > tonumber(now) then
  r.attempt = tonumber(attempt)
  redis.call('ZADD', delayed, due, id)
  r.state, r.score = 'scheduled', nil
else
  r.attempt, r.score = tonumber(attempt), nil
  make_ready(prefix, id, r, tonumber(now))
end
save(id, r)
flush()
wake(prefix) -- a release or a retry: idle workers take it, or learn the new due time
return {1, r.state}
