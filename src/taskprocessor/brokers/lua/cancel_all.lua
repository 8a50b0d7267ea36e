-- Cancel every queued and scheduled task of a queue.
-- KEYS: ready, delayed. ARGV: prefix, result_ttl_ms, reason. Returns the count.
local ready, delayed = KEYS[1], KEYS[2]
local prefix, result_ttl_ms, reason = ARGV[1], ARGV[2], ARGV[3]
local count = 0
for _, set in ipairs({ready, delayed}) do
  local ids = redis.call('ZRANGE', set, 0, -1)
  fetch_states(ids)
  for _, id in ipairs(ids) do
    local state = state_of(id)
    if state == 'queued' or state == 'scheduled' then
      local error_fields = {kind = 'cancelled', reason = reason}
      local outcome = outcome_json(id, 'cancelled', record(id).attempt, error_fields)
      finish(prefix, id, outcome, result_ttl_ms)
      count = count + 1
    end
  end
  redis.call('DEL', set)
end
flush()
return count
