-- A queue's counts. KEYS: ready, delayed, leases, dead. ARGV: prefix, now_ms.
-- Returns {ready, delayed, due, leased, dead, enqueued, finished, p1, n1, p2, n2, ...}.
local ready, delayed, leases, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, now = ARGV[1], ARGV[2]
local totals = redis.call('HMGET', prefix .. 'stats', 'enqueued', 'finished')
local out = {
  redis.call('ZCARD', ready), redis.call('ZCARD', delayed),
  redis.call('ZCOUNT', delayed, '-inf', now), redis.call('ZCARD', leases),
  redis.call('ZCARD', dead), tonumber(totals[1] or 0), tonumber(totals[2] or 0),
}
if out[1] > 0 then
  for priority = 100, 0, -1 do
    local low = (100 - priority) * PRIORITY_SPAN
    local count = redis.call('ZCOUNT', ready, int(low), '(' .. int(low + PRIORITY_SPAN))
    if count > 0 then
      out[#out + 1] = priority
      out[#out + 1] = count
    end
  end
end
return out
