-- Take back expired leases: each such task is ready again with attempt + 1, or
-- dead-lettered once it has used up its attempts, or CANCELLED if that was asked.
-- KEYS: leases, ready
-- ARGV: prefix, after_ms (added to the server's clock: tests look ahead), limit,
--       result_ttl_ms, max_dead
-- Returns {requeued ids}, {dead-lettered ids}, {cancelled ids}.
local leases, ready = KEYS[1], KEYS[2]
local prefix, limit, result_ttl_ms, max_dead = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local now = int(server_ms() + tonumber(ARGV[2]))
local requeued, dead, cancelled = {}, {}, {}
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  redis.call('ZREM', leases, id)
  local h = task_key(prefix, id)
  local f = redis.call('HMGET', h, 'state', 'cancel', 'max')
  if f[1] == 'running' then
    local attempt = redis.call('HINCRBY', h, 'attempt', 1)
    redis.call('HDEL', h, 'token')
    local max_attempts = tonumber(f[3])
    if f[2] then
      local outcome = outcome_json(id, 'cancelled', attempt, {kind = 'cancelled', reason = 'cancelled'})
      finish(prefix, h, 'cancelled', outcome, result_ttl_ms)
      cancelled[#cancelled + 1] = id
    elseif max_attempts and max_attempts > 0 and attempt >= max_attempts then
      local reason = 'its worker was lost (lease expired) on attempt ' .. attempt .. ' of ' .. max_attempts
      local error_fields = {kind = 'failed', type = 'LeaseExpired', message = reason}
      bury(prefix, h, id, 'failed', outcome_json(id, 'failed', attempt, error_fields, reason), reason, max_dead)
      dead[#dead + 1] = id
    else
      make_ready(prefix, h, id, tonumber(now))
      requeued[#requeued + 1] = id
    end
  end
end
if #requeued > 0 then
  wake(prefix)
end
return {requeued, dead, cancelled}
