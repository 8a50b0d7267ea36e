-- A worker process waits for fewer tasks than it registered (see park.lua): lower its
-- free slots on a queue to at most cap minus what its inbox holds. When it stops waiting
-- altogether: unregister, hand the tasks in its inbox back to their queue positions (as
-- a release does), and push '!' so that its pending BLPOP, if any, returns.
-- KEYS: idle, leases, ready
-- ARGV: prefix, worker, cap, ttl_ms, stop ('1' = stop waiting; cap is then ignored)
-- Returns the ids handed back.
local idle, leases, ready = KEYS[1], KEYS[2], KEYS[3]
local prefix, worker, cap, ttl, stop = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local inbox = prefix .. 'inbox:' .. worker
local reg = prefix .. 'idle:' .. worker

if stop ~= '1' then
  local n = tonumber(redis.call('HGET', reg, 'n'))
  if n then
    local room = cap - redis.call('LLEN', inbox)
    if room <= 0 then
      redis.call('ZREM', idle, worker)
      redis.call('DEL', reg)
    elseif room < n then
      redis.call('HSET', reg, 'n', room)
    end
  end
  return {}
end

redis.call('ZREM', idle, worker)
redis.call('DEL', reg)
local items = redis.call('LRANGE', inbox, 0, -1)
redis.call('DEL', inbox)
local back, parsed = {}, {}
for _, item in ipairs(items) do
  local token, length, rest = string.match(item, '^(%d+) %d+ %d+ %d+ (%d+)\n(.*)$')
  if token then
    local id = string.sub(rest, 1, tonumber(length))
    parsed[#parsed + 1] = {id, token}
  end
end
for _, item in ipairs(parsed) do
  local id, token = item[1], item[2]
  local r = lease_of(id) == token and record(id)
  if r and r.score then
    redis.call('ZREM', leases, id)
    redis.call('ZADD', ready, r.score, id)
    put(RUNS, id, false)
    back[#back + 1] = id
  end
end
flush()
if #back > 0 then
  wake(prefix) -- another idle worker process takes them
end
redis.call('RPUSH', inbox, '!')
redis.call('PEXPIRE', inbox, ttl)
return back
