-- Helpers shared by every script: the loader puts this file in front of each one.
--
-- Keys of one queue share the hash tag {tp:<queue>} and so one cluster slot. ARGV[1] of
-- every script is the queue's key prefix. A queue's tasks live in four hashes of that
-- slot, so that a script reads or writes the tasks of a whole batch with one command per
-- hash, whatever the batch's size, and the hot path (claim, ack) handles plain strings:
--   <prefix>rec   id -> the task's record, a JSON object: state (queued or scheduled:
--                 the waiting states), prio, max (attempts), name, ckey (its concurrency
--                 key), reply (the producer's channel), watch (more channels, space-
--                 separated), score (its ready score), rt (ready since, ms), attempt,
--                 lost (leases lost), cancel. Numbers of more than 14 digits (score) are
--                 strings: cjson, like Lua's tostring, keeps 14 digits.
--   <prefix>body  id -> the task's body, as submitted
--   <prefix>run   id -> '<token>\n<worker>', and '\n' and a JSON object of lc, lk, lr,
--                 lq when the lease holds global limits (see release_limits): the task
--                 is running
--   <prefix>end   id -> '<exp_ms>\n<token>\n<outcome>\n<dead reason>': the task is
--                 finished (the outcome's own state field says how); exp_ms is '' for a
--                 dead letter, token that of the lease that recorded it ('' for none)
-- A finished task past its expiry reads as absent at once. Each script call that
-- finishes tasks pushes one entry to the list <prefix>exp, '<exp_ms> <id> <id>...' (JSON
-- after the time when an id would not read back), and sweep() deletes the tasks of
-- entries due: per task, expiry costs no command.
--
-- A script reads what it needs of a batch first (fetch: one HMGET per hash), works on
-- the values in memory, and writes every change at the end with flush(): one HDEL and
-- one HSET per hash. The two hot scripts (reserve's leasing, ack) do the same on plain
-- arrays, without these helpers' per-task bookkeeping, and search records for the few
-- fields they need instead of decoding them (field).

local PRIORITY_SPAN = 70368744177664 -- 2^46 sequence numbers per priority level

local FINAL = {succeeded = true, failed = true, timed_out = true, cancelled = true, expired = true}

local PREFIX = ARGV[1] or ''
local BATCH = 1000 -- ids per command: unpack() has a limit, and so has the Lua stack

local function int(n)
  return string.format('%.0f', n)
end

-- A field of a record's JSON, found without decoding it: the text after '"<name>":',
-- unquoted, up to the next comma or brace. cjson escapes every quote inside a string, so
-- '"<name>":' can only be the record's own field. nil when absent.
local function field(raw, name)
  local key = '"' .. name .. '":'
  local at = string.find(raw, key, 1, true)
  if at then
    return string.match(raw, '^%s*"?([^,}"]*)', at + #key)
  end
  return nil
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

-- One hash of the queue, as this script sees it: values read (false: absent) and the
-- writes to flush (a value, or false to delete).
local function hash(suffix)
  return {key = PREFIX .. suffix, seen = {}, changed = {}, order = {}}
end
local RECORDS, BODIES, RUNS, ENDS = hash('rec'), hash('body'), hash('run'), hash('end')
local EXPIRY = PREFIX .. 'exp'

-- Read the values of ids not read yet, one HMGET per BATCH.
local function fetch(h, ids)
  local missing = {}
  for _, id in ipairs(ids) do
    if h.seen[id] == nil then
      missing[#missing + 1] = id
    end
  end
  for first = 1, #missing, BATCH do
    local last = math.min(first + BATCH - 1, #missing)
    local values = redis.call('HMGET', h.key, unpack(missing, first, last))
    for i = first, last do
      h.seen[missing[i]] = values[i - first + 1] or false
    end
  end
end

-- The values of ids in two hashes, as two arrays in the order of ids (false where there
-- is none): one HMGET per hash and BATCH, without fetch's per-task bookkeeping (the hot
-- scripts' read).
local function read_two(ids, one, other)
  local first_values, other_values = {}, {}
  for first = 1, #ids, BATCH do
    local last = math.min(first + BATCH - 1, #ids)
    local a = redis.call('HMGET', one.key, unpack(ids, first, last))
    local b = redis.call('HMGET', other.key, unpack(ids, first, last))
    for i = first, last do
      first_values[i], other_values[i] = a[i - first + 1], b[i - first + 1]
    end
  end
  return first_values, other_values
end

-- The value of id, or nil.
local function get(h, id)
  local v = h.seen[id]
  if v == nil then
    v = redis.call('HGET', h.key, id) or false
    h.seen[id] = v
  end
  return v or nil
end

-- Set (value) or delete (false) id's value, at flush.
local function put(h, id, value)
  h.seen[id] = value
  if not h.changed[id] then
    h.changed[id] = true
    h.order[#h.order + 1] = id
  end
end

local function flush_hash(h)
  local deleted, writes = {}, {}
  for _, id in ipairs(h.order) do
    local v = h.seen[id]
    if v then
      writes[#writes + 1] = id
      writes[#writes + 1] = v
    else
      deleted[#deleted + 1] = id
    end
  end
  in_slices('HDEL', h.key, deleted)
  in_slices('HSET', h.key, writes, 2)
end

-- A finished task: {exp, token, outcome, dead, state}, or false when it is not finished,
-- or 'expired' (the task reads as absent).
local function ending(id)
  local v = get(ENDS, id)
  if not v then
    return false
  end
  local exp, token, outcome, dead = string.match(v, '^(%d*)\n(%d*)\n([^\n]*)\n(.*)$')
  if not exp then
    return false
  end
  if exp ~= '' and tonumber(exp) <= clock() then
    return 'expired'
  end
  -- cjson escapes every quote inside a string, so this finds the outcome's own field.
  local state = string.match(outcome, '"state":%s*"([%a_]+)"') or 'failed'
  return {exp = exp, token = token, outcome = outcome, dead = dead, state = state}
end

-- Read what state_of needs for ids in one round of HMGETs.
local function fetch_states(ids)
  fetch(ENDS, ids)
  fetch(RUNS, ids)
  fetch(RECORDS, ids)
end

-- A task's state: nil when unknown (never stored, expired or deleted); '' for a record
-- no script wrote (a foreign tool's), whose state cannot be read.
local function state_of(id)
  local e = ending(id)
  if e == 'expired' then
    return nil
  elseif e then
    return e.state
  end
  if get(RUNS, id) then
    return 'running'
  end
  local raw = get(RECORDS, id)
  if not raw then
    return nil
  end
  return field(raw, 'state') or ''
end

-- A running task's lease: its token and its raw value, or nil.
local function lease_of(id)
  local v = get(RUNS, id)
  if not v then
    return nil
  end
  return string.match(v, '^(%d+)'), v
end

-- A task's record as a table ({} when unreadable), or nil.
local decoded = {}
local function record(id)
  local r = decoded[id]
  if r == nil then
    local raw = get(RECORDS, id)
    if not raw then
      return nil
    end
    local ok, value = pcall(cjson.decode, raw)
    r = ok and type(value) == 'table' and value or {}
    decoded[id] = r
  end
  return r
end

local function save(id, r)
  decoded[id] = r
  put(RECORDS, id, cjson.encode(r))
end

-- Delete every trace of a task.
local function drop(id)
  decoded[id] = nil
  put(RECORDS, id, false)
  put(BODIES, id, false)
  put(RUNS, id, false)
  put(ENDS, id, false)
end

local expiring, expiring_at = {}, nil

-- Record how a task ended: kept result_ttl_ms, or forever for a dead letter (dead ~= '');
-- token is the lease's that recorded it, if any.
local function record_end(id, outcome, result_ttl_ms, dead, token)
  local exp = ''
  if dead == '' then
    local at = clock() + tonumber(result_ttl_ms)
    exp = int(at)
    if not expiring_at or at > expiring_at then
      expiring_at = at
    end
    expiring[#expiring + 1] = id
  end
  put(RUNS, id, false)
  put(ENDS, id, exp .. '\n' .. (token or '') .. '\n' .. outcome .. '\n' .. dead)
end

-- Delete the tasks of the first entries of exp that are due (up to 8 entries). A task
-- that ended again later (its id submitted anew) stays; an entry behind one not yet due
-- waits for it (its tasks read as absent meanwhile: only their memory waits).
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
  fetch(ENDS, due)
  for _, id in ipairs(due) do
    if ending(id) == 'expired' then
      drop(id)
    end
  end
end

-- Write every change this script made.
local function flush()
  flush_hash(RECORDS)
  flush_hash(BODIES)
  flush_hash(RUNS)
  flush_hash(ENDS)
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

-- The channels to tell how a task ended: the producer's and its watchers'.
local function channels_of(id)
  local raw = get(RECORDS, id)
  if not raw then
    return nil, nil
  end
  if string.find(raw, '\\', 1, true) then
    local r = record(id) -- an escaped character somewhere: let cjson read it
    return r.reply, r.watch
  end
  return field(raw, 'reply'), field(raw, 'watch')
end

-- Tell the producer (and anyone who looked the task up) how the task ended.
local function publish(id, message)
  local reply, watchers = channels_of(id)
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

-- Queue a task (again) at its score, or at a new one behind its equals.
local function make_ready(prefix, id, r, now)
  local score = r.score
  if not score then
    score = ready_score(prefix, r.prio or 50)
  end
  redis.call('ZADD', prefix .. 'ready', score, id)
  r.state, r.score, r.rt = 'queued', score, int(now)
  save(id, r)
end

-- A final state: store the outcome and publish it, kept result_ttl_ms (0: not at all).
local function finish(prefix, id, outcome, result_ttl_ms)
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(id, outcome)
  if tonumber(result_ttl_ms) > 0 then
    record_end(id, outcome, result_ttl_ms, '', '')
  else
    drop(id)
  end
end

-- A final state kept in the dead letters (no expiry); returns ids dropped past the bound.
local function bury(prefix, id, outcome, reason, max_dead, token)
  record_end(id, outcome, 0, reason, token)
  local dead = prefix .. 'dead'
  redis.call('ZADD', dead, redis.call('INCR', prefix .. 'seq'), id)
  redis.call('HINCRBY', prefix .. 'stats', 'finished', 1)
  publish(id, outcome)
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

-- A lease's value in RUNS: its token, the worker, and the global limits it holds, if any
-- (JSON: a concurrency key may hold any character).
local function lease_value(token, worker, hold)
  if not (hold.lc or hold.lk or hold.lr or hold.lq) then
    return token .. '\n' .. worker
  end
  return token .. '\n' .. worker .. '\n' .. cjson.encode(hold)
end

-- Global limits (see _redis_limits.py). A claim records in the lease's value what it
-- holds: concurrency counters (lc, lk) and rate limit tokens ('<interval_us> <key>' in
-- lr, lq). The script that ends the lease gives them back once; a release (the task
-- never started) also refunds the tokens. A freed slot wakes an idle worker process, as
-- tasks held back by a full concurrency limit wait for nothing else.
local function release_limits(prefix, lease, refund)
  local held = lease and string.match(lease, '^[^\n]*\n[^\n]*\n(.*)$')
  if not held then
    return -- token and worker only: no limit held
  end
  local hold = cjson.decode(held)
  local f = {hold.lc, hold.lk, hold.lr, hold.lq}
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
