-- Accept a task: ready now (ZADD ready by packed score) or later (ZADD delayed by due time).
-- KEYS: task hash, ready, delayed, unique key (or the task hash again when not unique),
--       leases, idle (workers registered by park.lua), limits (task name -> limits)
-- ARGV: prefix, id, body, priority, due_ms ('' = now), now_ms, reply, max_attempts,
--       unique_ttl_ms ('' = no unique key), task name, concurrency key ('' = none, else
--       '=' and the key: the claim reads both for global limits without decoding the body)
-- Returns {1, id, state} when accepted, {0, existing_id, state} for a duplicate; state
-- 'running' means the task was handed off to an idle worker process (see hand_off below).
local h, ready, delayed, unique = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leases, idle, limits = KEYS[5], KEYS[6], KEYS[7]
local prefix, id, body, priority, due, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local reply, max_attempts, unique_ttl = ARGV[7], ARGV[8], ARGV[9]
local name, ckey = ARGV[10], ARGV[11]

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

local fields = {'body', body, 'prio', priority, 'attempt', 0, 'max', max_attempts, 'name', name}
if ckey ~= '' then
  fields[#fields + 1] = 'ckey'
  fields[#fields + 1] = string.sub(ckey, 2)
end
if reply ~= '' then
  fields[#fields + 1] = 'reply'
  fields[#fields + 1] = reply
end
-- Hand-off: a task ready now goes straight to an idle worker process registered by
-- park.lua, leased as reserve.lua would lease it, and pushed to that worker's inbox, so
-- the worker starts it without a claim round trip. Only while the queue is empty (no task
-- ready, none due), so it overtakes nothing, and for a type without global limits (those
-- are the claim's to check). The worker registered longest ago goes first.
local function hand_off(score, fields)
  if redis.call('EXISTS', idle) == 0 or redis.call('EXISTS', ready) == 1 then
    return false
  end
  if redis.call('HEXISTS', limits, name) == 1 then
    return false
  end
  if redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1)[1] then
    return false
  end
  local t = server_ms()
  for _, worker in ipairs(redis.call('ZRANGEBYSCORE', idle, '(' .. int(t), '+inf', 'LIMIT', 0, 5)) do
    local reg = prefix .. 'idle:' .. worker
    local f = redis.call('HMGET', reg, 'n', 'lease')
    local n = tonumber(f[1])
    if n and n > 0 then
      if n == 1 then
        redis.call('ZREM', idle, worker)
        redis.call('DEL', reg)
      else
        redis.call('HSET', reg, 'n', n - 1)
      end
      local token = redis.call('INCR', prefix .. 'fence')
      local deadline = int(t + tonumber(f[2]))
      redis.call('ZADD', leases, deadline, id)
      redis.call('HSET', h, 'state', 'running', 'token', token, 'score', score, 'rt', now,
        'worker', worker, unpack(fields))
      local inbox = prefix .. 'inbox:' .. worker
      redis.call('RPUSH', inbox, int(token) .. ' ' .. deadline .. ' 0 ' .. now .. ' ' .. #id
        .. '\n' .. id .. body)
      redis.call('PEXPIRE', inbox, f[2])
      return true
    end
    redis.call('ZREM', idle, worker) -- its registration lapsed or was used up
  end
  return false
end

local state
if due ~= '' and tonumber(due) > tonumber(now) then
  state = 'scheduled'
  redis.call('ZADD', delayed, due, id)
  redis.call('HSET', h, 'state', state, unpack(fields))
else
  local score = ready_score(prefix, priority)
  if hand_off(score, fields) then
    state = 'running'
  else
    state = 'queued'
    redis.call('ZADD', ready, score, id)
    redis.call('HSET', h, 'state', state, 'score', score, 'rt', now, unpack(fields))
  end
end
redis.call('HINCRBY', prefix .. 'stats', 'enqueued', 1)
if unique_ttl ~= '' then
  redis.call('SET', unique, id, 'PX', unique_ttl)
end
if state ~= 'running' then
  wake(prefix)
end
return {1, id, state}
