-- Helpers shared by every script: the loader puts this file in front of each one.
--
-- Keys of one queue share the hash tag {tp:<queue>} and so one cluster slot. ARGV[1] of
-- every script is the queue's key prefix. A queue's tasks live in two hashes of that
-- slot, so that a script reads or writes the tasks of a whole batch with one command,
-- whatever the batch's size:
--   <prefix>rec   id -> the task's record: a JSON object of the fields below
--   <prefix>body  id -> the task's body, as submitted
-- A finished task's record holds its expiry (exp, ms on the server's clock); a record
-- past its expiry reads as absent at once. Each script call that finishes tasks pushes
-- one entry to the list <prefix>exp, '<exp_ms> <id> <id>...' (ids space-free, else
-- JSON), and sweep() deletes the records of entries due, a batch at a time: per task it
-- costs no command, only a few bytes.
--
-- Record fields: state, attempt, prio, max (attempts), name, ckey (its concurrency key),
-- reply (the producer's channel), watch (more channels, space-separated), score (its
-- ready score), rt (ready since, ms), token (its lease's), worker, lost (leases lost),
-- cancel, outcome, dead (the dead-letter reason), exp, and the global limits its lease
-- holds: lc, lk, lr, lq (see release_limits). Numbers of more than 14 digits (score,
-- token) are strings: cjson, like Lua's tostring, keeps 14 digits, and a score needs 16.
--
-- A script loads the records it needs (load, load_many: one HMGET per batch), changes
-- them as tables (save, expire, drop) and writes every change at the end with flush():
-- one HDEL and one HSET per hash, whatever the number of tasks.

local PRIORITY_SPAN = 70368744177664 -- 2^46 sequence numbers per priority level

local FINAL = {succeeded = true, failed = true, timed_out = true, cancelled = true, expired = true}

local PREFIX = ARGV[1] or ''
local RECORDS, BODIES, EXPIRY = PREFIX .. 'rec', PREFIX .. 'body', PREFIX .. 'exp'
local BATCH = 1000 -- ids per command: unpack() has a limit, and so has the Lua stack

local function int(n)
  return string.format('%.0f', n)
end

local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The server's clock, read once per script: expiries are compared against it.
local clock_ms = nil
local function clock()
  if not clock_ms then
    clock_ms = server_ms()
  end
  return clock_ms
end

-- Run command(key, ...) over items in slices of at most BATCH * per items.
local function in_slices(command, key, items, per)
  local size = BATCH * (per or 1)
  for first = 1, #items, size do
    redis.call(command, key, unpack(items, first, math.min(first + size - 1, #items)))
  end
end

-- The records this script has read or changed: id -> table, or false when absent.
local cache, dirty, gone, expiring = {}, {}, {}, {}
local expiring_at = nil -- the latest expiry among expiring

local function decode_record(raw)
  if not raw then
    return false
  end
  local ok, r = pcall(cjson.decode, raw)
  if not ok or type(r) ~= 'table' then
    return {} -- unreadable (written by a foreign tool): a task with no known fields
  end
  if r.exp and tonumber(r.exp) <= clock() then
    return false -- expired, waiting for a sweep
  end
  return r
end

-- The record of a task, or nil when there is none.
local function load(id)
  local r = cache[id]
  if r == nil then
    r = decode_record(redis.call('HGET', RECORDS, id))
    cache[id] = r
  end
  return r or nil
end

-- Read the records of ids in one HMGET (per BATCH); load() then answers from memory.
local function load_many(ids)
  local missing = {}
  for _, id in ipairs(ids) do
    if cache[id] == nil then
      missing[#missing + 1] = id
    end
  end
  for first = 1, #missing, BATCH do
    local last = math.min(first + BATCH - 1, #missing)
    local raws = redis.call('HMGET', RECORDS, unpack(missing, first, last))
    for i = first, last do
      cache[missing[i]] = decode_record(raws[i - first + 1])
    end
  end
end

-- The bodies of ids, in order (false where there is none).
local function bodies(ids)
  local out = {}
  for first = 1, #ids, BATCH do
    local last = math.min(first + BATCH - 1, #ids)
    local raws = redis.call('HMGET', BODIES, unpack(ids, first, last))
    for i = first, last do
      out[i] = raws[i - first + 1]
    end
  end
  return out
end

local function save(id, r)
  cache[id] = r
  if not dirty[id] then
    dirty[id] = true
    dirty[#dirty + 1] = id
  end
end

-- Delete a task: its record and its body.
local function drop(id)
  cache[id] = false
  gone[#gone + 1] = id
end

-- Keep a finished task's record for ttl_ms more.
local function expire(id, r, ttl_ms)
  local at = clock() + tonumber(ttl_ms)
  r.exp = int(at)
  if not expiring_at or at > expiring_at then
    expiring_at = at
  end
  expiring[#expiring + 1] = id
  save(id, r)
end

-- Delete the records of the first entries of exp that are due (up to 8 entries). A record
-- whose expiry is later than its entry's (written anew since, by a submit reusing the
-- id) stays; an entry behind one not yet due waits for it (its records read as absent
-- meanwhile: only their memory waits).
local function sweep()
  local head = redis.call('LRANGE', EXPIRY, 0, 7)
  local now, due, entries = clock(), {}, 0
  for _, entry in ipairs(head) do
    local space = string.find(entry, ' ', 1, true)
    if not space or tonumber(string.sub(entry, 1, space - 1)) > now then
      break
    end
    entries = entries + 1
    local rest = string.sub(entry, space + 1)
    if string.sub(rest, 1, 1) == '[' then
      for _, id in ipairs(cjson.decode(rest)) do
        due[#due + 1] = id
      end
    else
      for id in string.gmatch(rest, '%S+') do
        due[#due + 1] = id
      end
    end
  end
  if entries == 0 then
    return
  end
  redis.call('LTRIM', EXPIRY, entries, -1)
  load_many(due)
  for _, id in ipairs(due) do
    if not cache[id] then
      drop(id)
    end
  end
end

-- Write every change this script made: deletions, then records, then expiries.
local function flush()
  local deleted = {}
  for _, id in ipairs(gone) do
    if cache[id] == false then
      deleted[#deleted + 1] = id
    end
  end
  if #deleted > 0 then
    in_slices('HDEL', RECORDS, deleted)
    in_slices('HDEL', BODIES, deleted)
  end
  local writes = {}
  for _, id in ipairs(dirty) do
    local r = cache[id]
    if r then
      writes[#writes + 1] = id
      writes[#writes + 1] = cjson.encode(r)
    end
  end
  if #writes > 0 then
    in_slices('HSET', RECORDS, writes, 2)
  end
  if #expiring > 0 then
    local plain = true
    for _, id in ipairs(expiring) do
      if string.find(id, '%s') or string.sub(id, 1, 1) == '[' then
        plain = false -- an id that would not read back from a space-separated list
        break
      end
    end
    local ids = plain and table.concat(expiring, ' ') or cjson.encode(expiring)
    redis.call('RPUSH', EXPIRY, int(expiring_at) .. ' ' .. ids)
  end
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
local function publish(r, message)
  local reply, watchers = r.reply, r.watch
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

local function make_ready(prefix, id, r, now)
  local score = r.score
  if not score then
    score = ready_score(prefix, r.prio or 50)
  end
  redis.call('ZADD', prefix .. 'ready', score, id)
  r.state, r.score, r.rt, r.token = 'queued', score, int(now), nil
  save(id, r)
end

-- A final state: store the outcome, publish it, keep the record for result_ttl_ms.
local function finish(prefix, id, r, state, outcome, result_ttl_ms)
  r.state, r.outcome = state, outcome
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(r, outcome)
  if tonumber(result_ttl_ms) > 0 then
    expire(id, r, result_ttl_ms)
  else
    drop(id)
  end
end

-- A final state kept in the dead letters (no expiry); returns ids dropped past the bound.
local function bury(prefix, id, r, state, outcome, reason, max_dead)
  r.state, r.outcome, r.dead, r.exp = state, outcome, reason, nil
  save(id, r)
  local dead = prefix .. 'dead'
  redis.call('ZADD', dead, redis.call('INCR', prefix .. 'seq'), id)
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(r, outcome)
  local dropped = {}
  local extra = redis.call('ZCARD', dead) - tonumber(max_dead)
  if extra > 0 then
    local oldest = redis.call('ZPOPMIN', dead, extra)
    for i = 1, #oldest, 2 do
      drop(oldest[i])
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

-- Global limits (see _redis_limits.py). A claim records in the task's record what its
-- lease holds: concurrency counters (lc, lk) and rate limit tokens ('<interval_us> <key>'
-- in lr, lq). The script that ends the lease gives them back once (and saves the record);
-- a release (the task never started) also refunds the tokens. A freed slot wakes an idle
-- worker process, as tasks held back by a full concurrency limit wait for nothing else.
local function release_limits(prefix, r, refund)
  local f = {r.lc, r.lk, r.lr, r.lq}
  if not (f[1] or f[2] or f[3] or f[4]) then
    return
  end
  r.lc, r.lk, r.lr, r.lq = nil, nil, nil, nil
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
