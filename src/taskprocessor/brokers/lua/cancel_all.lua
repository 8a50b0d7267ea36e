-- Cancel every queued and scheduled task of a queue.
-- KEYS: ready, delayed. ARGV: prefix, result_ttl_ms, reason. Returns the count.
local ready, delayed = KEYS[1], KEYS[2]
local prefix, result_ttl_ms, reason = ARGV[1], ARGV[2], ARGV[3]
local count = 0
for _, set in ipairs({ready, delayed}) do
  local ids = redis.call('ZRANGE', set, 0, -1)
  for _, id in ipairs(ids) do
    local h = task_key(prefix, id)
    local attempt = redis.call('HGET', h, 'attempt')
    if attempt then
      finish(prefix, h, 'cancelled', outcome_json(id, 'cancelled', attempt, {kind = 'cancelled', reason = reason}), result_ttl_ms)
      count = count + 1
    end
  end
  redis.call('DEL', set)
end
return count
