-- Accept tasks of one queue, in order: each ready now (ZADD ready by packed score),
-- later (ZADD delayed by due time), or handed off to an idle worker process.
-- KEYS: ready, delayed, leases, idle (workers registered by park.lua),
--       limits (task name -> limits)
-- ARGV: prefix, reply channel ('' = none), tasks: a JSON array of
--       [id, body, priority, due_ms ('' = now), now_ms (the producer's clock), max_attempts,
--        name, concurrency key ('' = none, else '=' and the key: the claim reads both for
--        global limits without decoding the body), unique key ('' = none), unique_ttl_ms]
-- Returns one reply per task, in order: {1, id, state} when accepted, {0, existing_id,
-- state} for a duplicate; state 'running' means the task was handed off to an idle
-- worker process (see hand_off below).
-- The states of the whole call's tasks are read with one HMGET per hash, and the records
-- and bodies written with one HSET each; the sequence numbers, the ZADDs, the count and
-- the wake go once per call too.
local ready, delayed, leases, idle, limits = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, reply = ARGV[1], ARGV[2]
local tasks = cjson.decode(ARGV[3])

-- Hand-off: a task ready now goes straight to an idle worker process registered by
-- park.lua, leased as reserve.lua would lease it, and pushed to that worker's inbox, so
-- the worker starts it without a claim round trip. Only while the queue is empty (no task
-- ready, none due: queued_here counts those this call made ready), so it overtakes
-- nothing, and for a type without global limits (those are the claim's to check). The
-- worker registered longest ago goes first.
local queued_here = false
local function hand_off(id, r, body, now)
  if queued_here or redis.call('EXISTS', idle) == 0 or redis.call('EXISTS', ready) == 1 then
    return false
  end
  if redis.call('HEXISTS', limits, r.name) == 1 then
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
      local token = int(redis.call('INCR', prefix .. 'fence'))
      local deadline = int(t + tonumber(f[2]))
      redis.call('ZADD', leases, deadline, id)
      put(RUNS, id, lease_value(token, worker, {}))
      local inbox = prefix .. 'inbox:' .. worker
      redis.call('RPUSH', inbox, token .. ' ' .. deadline .. ' 0 ' .. r.rt .. ' ' .. #id
        .. '\n' .. id .. body)
      redis.call('PEXPIRE', inbox, f[2])
      return true
    end
    redis.call('ZREM', idle, worker) -- its registration lapsed or was used up
  end
  return false
end

-- One sequence number per task, taken at once (FIFO among equals; gaps are harmless).
local seq = redis.call('INCRBY', prefix .. 'seq', #tasks) - #tasks
local replies, scores, due_at = {}, {}, {}
local accepted, woken = 0, false

local ids = {}
for i, task in ipairs(tasks) do
  ids[i] = task[1]
end
fetch_states(ids)

for i, task in ipairs(tasks) do
  local id, body, priority, due, now = task[1], task[2], task[3], task[4], task[5]
  local max_attempts, name, ckey, unique_key, unique_ttl = task[6], task[7], task[8], task[9], task[10]
  local unique = unique_key ~= '' and prefix .. 'u:' .. unique_key
  local existing = unique and redis.call('GET', unique)
  local holder = existing and state_of(existing)
  local current = not holder and state_of(id)
  seq = seq + 1
  if holder and holder ~= '' then
    replies[i] = {0, existing, holder}
  elseif current then
    replies[i] = {0, id, current} -- the same id twice: a producer retrying after a lost reply
  else
    if get(ENDS, id) then
      put(ENDS, id, false) -- an expired end of an earlier task with this id
    end
    local r = {state = 'queued', prio = priority, attempt = 0, max = max_attempts, name = name}
    if ckey ~= '' then
      r.ckey = string.sub(ckey, 2)
    end
    if reply ~= '' then
      r.reply = reply
    end
    local state = 'queued'
    if due ~= '' and tonumber(due) > tonumber(now) then
      r.state, state = 'scheduled', 'scheduled'
      due_at[#due_at + 1] = due
      due_at[#due_at + 1] = id
    else
      r.score, r.rt = int((100 - tonumber(priority)) * PRIORITY_SPAN + seq), int(now)
      if hand_off(id, r, body, now) then
        state = 'running'
      else
        queued_here = true
        scores[#scores + 1] = r.score
        scores[#scores + 1] = id
      end
    end
    save(id, r)
    put(BODIES, id, body)
    if unique then
      redis.call('SET', unique, id, 'PX', unique_ttl)
    end
    accepted = accepted + 1
    woken = woken or state ~= 'running'
    replies[i] = {1, id, state}
  end
end
if #scores > 0 then
  in_slices('ZADD', ready, scores, 2)
end
if #due_at > 0 then
  in_slices('ZADD', delayed, due_at, 2)
end
sweep()
flush()
if accepted > 0 then
  redis.call('HINCRBY', prefix .. 'stats', 'enqueued', accepted)
end
if woken then
  wake(prefix)
end
return replies
