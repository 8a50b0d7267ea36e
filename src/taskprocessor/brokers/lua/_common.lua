-- Helpers shared by every script: the loader puts this file in front of each one.
--
-- Keys of one queue share the hash tag {tp:<queue>} and so one cluster slot; the
-- per-task hash <prefix>t:<id> is built here from ARGV, in that same slot.
-- Numbers bound for Redis are formatted with %.0f: Lua's own tostring keeps 14
-- digits only, and a ready score needs 16.

local PRIORITY_SPAN = 70368744177664 -- 2^46 sequence numbers per priority level

local FINAL = {succeeded = true, failed = true, timed_out = true, cancelled = true, expired = true}

local function int(n)
  return string.format('%.0f', n)
end

local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function task_key(prefix, id)
  return prefix .. 't:' .. id
end

-- The ready score: higher priority first, then FIFO by a queue-wide sequence.
local function ready_score(prefix, priority)
  local seq = redis.call('INCR', prefix .. 'seq')
  return int((100 - tonumber(priority)) * PRIORITY_SPAN + seq)
end

-- Wake one idle worker process blocked on the wake list (one marker is enough:
-- a woken process that leaves work behind wakes the next one).
local function wake(prefix)
  local key = prefix .. 'wake'
  if redis.call('LLEN', key) == 0 then
    redis.call('LPUSH', key, '1')
  end
end

-- Tell the producer (and anyone who looked the task up) how the task ended.
local function publish(h, message)
  local fields = redis.call('HMGET', h, 'reply', 'watch')
  local reply, watchers = fields[1], fields[2]
  if reply then
    redis.call('PUBLISH', reply, message)
  end
  if watchers then
    for channel in string.gmatch(watchers, '%S+') do
      if channel ~= reply then
        redis.call('PUBLISH', channel, message)
      end
    end
  end
end

local function make_ready(prefix, h, id, now)
  local score = redis.call('HGET', h, 'score')
  if not score then
    score = ready_score(prefix, redis.call('HGET', h, 'prio') or 50)
  end
  redis.call('ZADD', prefix .. 'ready', score, id)
  redis.call('HSET', h, 'state', 'queued', 'score', score, 'rt', int(now))
  redis.call('HDEL', h, 'token')
end

-- A final state: store the outcome, publish it, keep the hash for result_ttl_ms.
local function finish(prefix, h, state, outcome, result_ttl_ms)
  redis.call('HSET', h, 'state', state, 'outcome', outcome)
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(h, outcome)
  if tonumber(result_ttl_ms) > 0 then
    redis.call('PEXPIRE', h, result_ttl_ms)
  else
    redis.call('DEL', h)
  end
end

-- A final state kept in the dead letters (no expiry); returns ids dropped past the bound.
local function bury(prefix, h, id, state, outcome, reason, max_dead)
  redis.call('HSET', h, 'state', state, 'outcome', outcome, 'dead', reason)
  redis.call('PERSIST', h)
  local dead = prefix .. 'dead'
  redis.call('ZADD', dead, redis.call('INCR', prefix .. 'seq'), id)
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(h, outcome)
  local dropped = {}
  local extra = redis.call('ZCARD', dead) - tonumber(max_dead)
  if extra > 0 then
    local oldest = redis.call('ZPOPMIN', dead, extra)
    for i = 1, #oldest, 2 do
      redis.call('DEL', task_key(prefix, oldest[i]))
      dropped[#dropped + 1] = oldest[i]
    end
  end
  return dropped
end

-- An outcome built here (the client builds the others): plain strings only.
local function outcome_json(id, state, attempt, error_fields, dead_reason)
  return cjson.encode({
    id = id, state = state, attempt = tonumber(attempt) or 0, error = error_fields,
    dead_letter = dead_reason,
  })
end

-- Global limits (see _redis_limits.py). A claim records in the task hash what its lease
-- holds: concurrency counters (lc, lk) and rate limit tokens ('<interval_us> <key>' in
-- lr, lq). The script that ends the lease gives them back once; a release (the task
-- never started) also refunds the tokens. A freed slot wakes an idle worker process, as
-- tasks held back by a full concurrency limit wait for nothing else.
local LIMIT_FIELDS = {'lc', 'lk', 'lr', 'lq'}

local function release_limits(prefix, h, refund)
  local f = redis.call('HMGET', h, unpack(LIMIT_FIELDS))
  if not (f[1] or f[2] or f[3] or f[4]) then
    return
  end
  redis.call('HDEL', h, unpack(LIMIT_FIELDS))
  for i = 1, 2 do
    if f[i] and redis.call('DECR', f[i]) <= 0 then
      redis.call('DEL', f[i])
    end
  end
  if (f[1] or f[2]) and redis.call('EXISTS', prefix .. 'ready') == 1 then
    wake(prefix)
  end
  if refund and (f[3] or f[4]) then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    for i = 3, 4 do
      if f[i] then
        local space = string.find(f[i], ' ', 1, true)
        local key = string.sub(f[i], space + 1)
        local tat = tonumber(redis.call('GET', key))
        if tat then
          tat = tat - tonumber(string.sub(f[i], 1, space - 1))
          if tat <= now then
            redis.call('DEL', key)
          else
            redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
          end
        end
      end
    end
  end
end
