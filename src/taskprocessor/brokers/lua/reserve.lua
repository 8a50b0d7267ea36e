-- Claim up to n tasks: promote due delayed tasks, take the n best ready ids that every
-- global limit admits, lease them.
-- KEYS: ready, delayed, leases, limits (task name -> global limits; see _redis_limits.py)
-- ARGV: prefix, n, now_ms (producer clock, for delays), lease_ms, max_dead, window, worker
-- Returns {wake_ms or '', taken, more, id, body, attempt, token, ready_since_ms, cancel, ...}:
-- taken counts ids taken from ready, including any without a body (dead-lettered here);
-- more is 1 when n were taken and ready ids are left (the claimer may claim ahead);
-- wake_ms is the earliest of the next delayed task's due time and the time at which a
-- task held back by a limit may pass (a rate limit's next token, a breaker's reopening).
-- Lease deadlines use the server's clock, so no client clock can expire another's lease.
local ready, delayed, leases, limits = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, n, now, lease_ms, max_dead = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

-- Due delayed tasks become ready (the first delayed entry says whether any is due).
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local promoted = false
if first[2] and tonumber(first[2]) <= tonumber(now) then
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  in_slices('ZREM', delayed, due)
  fetch(RECORDS, due)
  local seq = redis.call('INCRBY', prefix .. 'seq', #due) - #due
  local scores = {}
  for _, id in ipairs(due) do
    local r = record(id)
    seq = seq + 1
    if r and r.prio then
      r.state, r.score, r.rt = 'queued', int((100 - tonumber(r.prio)) * PRIORITY_SPAN + seq), now
      save(id, r)
      scores[#scores + 1] = r.score
      scores[#scores + 1] = id
    end
  end
  if #scores > 0 then
    in_slices('ZADD', ready, scores, 2)
  end
  promoted = true
end

local out = {'', 0, 0}
local taken = 0
local wake_ms = nil
local deadline = int(server_ms() + tonumber(lease_ms))

local leased = {} -- the ids to lease, in order
local holds = {}  -- id -> the limits its lease takes ({field, key, ...}), if any

-- The leases are written once the claim is done (lease_all): one HMGET each of the
-- records and the bodies, one INCRBY for the fencing tokens, one ZADD for the deadlines
-- and one HSET of the leases (in flush), whatever the number of tasks. The records are
-- only searched for three fields (see field), not decoded.
local function take(id, hold)
  taken = taken + 1
  leased[taken] = id
  if hold and #hold > 0 then
    holds[id] = hold
  end
end

local function lease_all()
  local count = #leased
  if count == 0 then
    return
  end
  -- The hot path: plain arrays, no per-task table (see _common.lua for the helpers).
  local raws, found = read_two(leased, RECORDS, BODIES)
  local token = redis.call('INCRBY', prefix .. 'fence', count) - count
  local scores, runs, worker = {}, {}, ARGV[7]
  local o = #out
  for i = 1, count do
    local id, body, raw = leased[i], found[i], raws[i] or ''
    if not body then
      -- An id without a body (written by hand, or by a foreign tool): nothing to run.
      local reason = 'no task body is stored for this id'
      local error_fields = {kind = 'failed', type = 'DecodeError', message = reason}
      bury(prefix, id, outcome_json(id, 'failed', 0, error_fields, reason), reason, max_dead)
    else
      token = token + 1
      local mine = int(token)
      local hold = holds[id]
      local value = mine .. '\n' .. worker
      if hold then
        local held = {}
        for j = 1, #hold, 2 do
          held[hold[j]] = hold[j + 1]
        end
        value = lease_value(mine, worker, held)
      end
      runs[#runs + 1] = id
      runs[#runs + 1] = value
      scores[#scores + 1] = deadline
      scores[#scores + 1] = id
      -- attempt as stored, even if it is no count: the client dead-letters what it
      -- cannot read
      out[o + 1], out[o + 2], out[o + 3] = id, body, field(raw, 'attempt') or '0'
      out[o + 4], out[o + 5], out[o + 6] = mine, field(raw, 'rt') or now, field(raw, 'cancel') or ''
      o = o + 6
    end
  end
  if #scores > 0 then
    in_slices('ZADD', leases, scores, 2)
    in_slices('HSET', RUNS.key, runs, 2)
  end
end

if redis.call('EXISTS', limits) == 0 then
  -- No global limits on this queue: the n best, whatever they are.
  local popped = redis.call('ZPOPMIN', ready, n)
  for i = 1, #popped, 2 do
    take(popped[i], nil)
  end
else
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local now_ms = math.floor(now_us / 1000)
  local specs = {}    -- task name -> its limits, or false
  local counts = {}   -- counter key -> running count
  local tats = {}     -- rate limit key -> theoretical arrival time, us
  local shut = {}     -- breaker key -> whether it is open
  local full = {}     -- limit key -> true: held back for the rest of this claim
  local held_type = {} -- task name -> true: a limit of the whole type holds it back

  local function wake_at(ms)
    if not wake_ms or ms < wake_ms then
      wake_ms = ms
    end
  end

  local function spec_of(name)
    local spec = specs[name]
    if spec == nil then
      local raw = redis.call('HGET', limits, name)
      local ok, decoded = pcall(cjson.decode, raw or '')
      spec = ok and type(decoded) == 'table' and decoded or false
      specs[name] = spec
    end
    return spec
  end

  -- A record without a name (written by a foreign tool): read it from the body once.
  local function learn(id, r, body)
    local ok, envelope = pcall(cjson.decode, body)
    if not ok or type(envelope) ~= 'table' or type(envelope.name) ~= 'string' then
      return nil, nil
    end
    r.name = envelope.name
    if type(envelope.key) == 'string' then
      r.ckey = envelope.key
    end
    save(id, r)
    return r.name, r.ckey
  end

  -- Room under a concurrency limit?
  local function below(key, limit)
    local count = counts[key]
    if count == nil then
      count = tonumber(redis.call('GET', key)) or 0
      counts[key] = count
    end
    if count < limit then
      return true
    end
    full[key] = true -- a running task's end wakes an idle worker
    return false
  end

  -- GCRA: the new theoretical arrival time if a token is free now, else nil.
  local function token(key, rule)
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key)) or 0
      tats[key] = tat
    end
    local interval = rule[1]
    local new_tat = math.max(tat, now_us) + interval
    local allow_at = new_tat - rule[2] * interval
    if allow_at <= now_us then
      return new_tat
    end
    full[key] = true
    wake_at(math.ceil(allow_at / 1000) + 1)
    return nil
  end

  -- A token of rate limit key r for the lease (recorded in hold and rates), or nil.
  local function rate(hold, rates, field, r, rule)
    local new_tat = not full[r] and token(r, rule)
    if not new_tat then
      return nil
    end
    rates[#rates + 1] = {r, new_tat}
    hold[#hold + 1] = field
    hold[#hold + 1] = string.format('%.3f', rule[1]) .. ' ' .. r
    return new_tat
  end

  local function open(key)
    local state = shut[key]
    if state == nil then
      local ttl = redis.call('PTTL', key)
      state = ttl ~= -2
      if ttl >= 0 then
        wake_at(now_ms + ttl + 1)
      end
      shut[key] = state
    end
    return state
  end

  -- The limit fields to record in the lease, or nil when a limit holds the task back.
  local function admit(name, key, spec)
    local hold = {}
    local counters, rates = {}, {}
    if spec.b and open(prefix .. 'open:' .. spec.b) then
      held_type[name] = true
      return nil
    end
    local tagged = #name .. ':' .. name .. ':'
    if spec.c then
      local c = prefix .. 'c:' .. name
      if not below(c, spec.c) then
        held_type[name] = true
        return nil
      end
      counters[#counters + 1] = c
      hold[#hold + 1] = 'lc'
      hold[#hold + 1] = c
    end
    if spec.kc and key then
      local c = prefix .. 'ck:' .. tagged .. key
      if full[c] or not below(c, spec.kc) then
        return nil
      end
      counters[#counters + 1] = c
      hold[#hold + 1] = 'lk'
      hold[#hold + 1] = c
    end
    if spec.r and not rate(hold, rates, 'lr', prefix .. 'r:' .. name, spec.r) then
      held_type[name] = true
      return nil
    end
    -- Tasks without a key share one rate (as in the process), but not a concurrency.
    local r = spec.kr and prefix .. 'rk:' .. tagged .. (key or '')
    if r and not rate(hold, rates, 'lq', r, spec.kr) then
      return nil
    end
    -- Every limit passed: take the slots and tokens.
    for _, c in ipairs(counters) do
      counts[c] = redis.call('INCR', c)
    end
    for _, rate in ipairs(rates) do
      tats[rate[1]] = rate[2]
      local ttl = math.ceil((rate[2] - now_us) / 1000) + 1
      redis.call('SET', rate[1], string.format('%.3f', rate[2]), 'PX', ttl)
    end
    return hold
  end

  -- Pages of candidates, small first: n tasks usually pass at the head of the queue.
  -- Leased ones leave the ready set, so the next page starts after the skipped ones.
  local budget = n + tonumber(ARGV[6])
  local skipped, size = 0, n + 8
  while taken < n and skipped + taken < budget do
    local page = redis.call('ZRANGE', ready, skipped, skipped + math.min(size, budget - skipped - taken) - 1)
    if #page == 0 then
      break
    end
    fetch(RECORDS, page)
    for _, id in ipairs(page) do
      if taken >= n then
        break
      end
      local r = record(id) or {}
      local name, key = r.name, r.ckey
      if not name then
        local body = get(BODIES, id)
        if body then
          name, key = learn(id, r, body)
        end
      end
      local hold = {} -- no limits: lease it as it is
      if name then
        if held_type[name] then
          hold = nil
        elseif spec_of(name) then
          hold = admit(name, key, spec_of(name))
        end
      end
      if hold then
        redis.call('ZREM', ready, id)
        take(id, hold)
      else
        skipped = skipped + 1
      end
    end
    size = size * 4
  end
end

lease_all()
flush()
out[2] = taken
if taken == n and redis.call('ZCARD', ready) > 0 then
  out[3] = 1
  wake(prefix) -- work is left: let another idle process have it
end
local nxt = promoted and redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES') or first
if nxt[2] and (not wake_ms or tonumber(nxt[2]) < wake_ms) then
  out[1] = nxt[2]
elseif wake_ms then
  out[1] = int(wake_ms)
end
return out
