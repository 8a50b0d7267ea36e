-- An idle worker process registers its free slots on a queue right before it blocks,
-- so that enqueue.lua can lease a new task to it and push it to its inbox (a hand-off:
-- the worker has the task without a claim round trip). Sent in one pipeline with the
-- worker's BLPOP on its inboxes and the wake lists (see _redis_handoff.py).
--
--   {tp:q}:idle            ZSET  worker -> registration expiry, ms on the server's clock
--   {tp:q}:idle:<worker>   HASH  n (free slots), lease (ms); PEXPIREs with the registration
--   {tp:q}:inbox:<worker>  LIST  tasks leased to the worker ("<token> <deadline_ms>
--                                <attempt> <ready_since_ms> <id length>\n<id><body>"),
--                                or a marker: '.' = return at once, '!' = stop waiting
--
-- Tasks already in the inbox are taken here (so a burst costs one round trip, not one
-- per task) and count against the slots; a '.' marker then makes the BLPOP that follows
-- this script return at once instead of blocking.
-- KEYS: idle
-- ARGV: prefix, worker, slots (callers waiting for this queue), ttl_ms, lease_ms
-- Returns {server_ms, slots registered, inbox item...}.
local idle = KEYS[1]
local prefix, worker, slots, ttl, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local inbox = prefix .. 'inbox:' .. worker
local reg = prefix .. 'idle:' .. worker
local now = server_ms()

local out = {now, 0}
local items = redis.call('LRANGE', inbox, 0, -1)
if #items > 0 then
  redis.call('DEL', inbox) -- markers left from earlier waits go too
  for _, item in ipairs(items) do
    if #item > 1 then -- a task, not a marker
      out[#out + 1] = item
      slots = slots - 1
    end
  end
  if #out > 2 then
    redis.call('RPUSH', inbox, '.')
    redis.call('PEXPIRE', inbox, ttl)
  end
end
redis.call('ZREMRANGEBYSCORE', idle, '-inf', now) -- registrations that lapsed
if slots > 0 then
  redis.call('HSET', reg, 'n', slots, 'lease', lease)
  redis.call('PEXPIRE', reg, ttl)
  redis.call('ZADD', idle, int(now + tonumber(ttl)), worker)
  out[2] = slots
else
  redis.call('ZREM', idle, worker)
  redis.call('DEL', reg)
end
return out
