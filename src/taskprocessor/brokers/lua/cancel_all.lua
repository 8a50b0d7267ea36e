-- Cancel every queued and scheduled task of a queue.
-- KEYS: ready, delayed. ARGV: prefix, result_ttl_ms, reason. Returns the count.
local ready, delayed = KEYS[1], KEYS[2]
local prefix, result_ttl_ms, reason = ARGV[1], ARGV[2], ARGV[3]
local count = 0
for _, set in ipairs({ready, delayed}) do
  local ids = redis.call('ZRANGE', set, 0, -1)
  load_many(ids)
  for _, id in ipairs(ids) do
    local r = load(id)
    if r and r.state then
      local error_fields = {kind = 'cancelled', reason = reason}
      finish(prefix, id, r, 'cancelled', outcome_json(id, 'cancelled', r.attempt, error_fields), result_ttl_ms)
      count = count + 1
    end
  end
  redis.call('DEL', set)
end
flush()
return count
