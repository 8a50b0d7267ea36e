-- Claim up to n tasks: promote due delayed tasks, pop the n best ready ids, lease them.
-- KEYS: ready, delayed, leases
-- ARGV: prefix, n, now_ms (producer clock, for delays), lease_ms, max_dead
-- Returns {next_due_ms or '', popped, id, body, attempt, token, ready_since_ms, cancel, ...}:
-- popped counts ids taken from ready, including any without a body (dead-lettered here).
-- Lease deadlines use the server's clock, so no client clock can expire another's lease.
local ready, delayed, leases = KEYS[1], KEYS[2], KEYS[3]
local prefix, n, now, lease_ms, max_dead = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', delayed, id)
  local h = task_key(prefix, id)
  local priority = redis.call('HGET', h, 'prio')
  if priority then
    local score = ready_score(prefix, priority)
    redis.call('ZADD', ready, score, id)
    redis.call('HSET', h, 'state', 'queued', 'score', score, 'rt', now)
  end
end

local out = {'', 0}
local deadline = int(server_ms() + tonumber(lease_ms))
local popped = redis.call('ZPOPMIN', ready, n)
out[2] = #popped / 2
for i = 1, #popped, 2 do
  local id = popped[i]
  local h = task_key(prefix, id)
  local f = redis.call('HMGET', h, 'body', 'attempt', 'rt', 'cancel')
  if not f[1] then
    -- An id without a body (written by hand, or by a foreign tool): nothing to run.
    local reason = 'no task body is stored for this id'
    local error_fields = {kind = 'failed', type = 'DecodeError', message = reason}
    bury(prefix, h, id, 'failed', outcome_json(id, 'failed', 0, error_fields, reason), reason, max_dead)
  else
    local token = redis.call('INCR', prefix .. 'fence')
    redis.call('HSET', h, 'state', 'running', 'token', token)
    redis.call('ZADD', leases, deadline, id)
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or '0'
    out[#out + 1] = token
    out[#out + 1] = f[3] or now
    out[#out + 1] = f[4] or ''
  end
end
if #popped == 2 * n and redis.call('ZCARD', ready) > 0 then
  wake(prefix) -- work is left: let another idle process have it
end
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if nxt[2] then
  out[1] = nxt[2]
end
return out
