-- Heartbeat: push back the lease deadlines of tasks this worker still holds.
-- KEYS: leases
-- ARGV: prefix, lease_ms, id1, token1, id2, token2, ...
-- Returns {lost ids}, {ids whose cancellation was requested}.
local leases = KEYS[1]
local deadline = int(server_ms() + tonumber(ARGV[2]))
local ids = {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
fetch(RUNS, ids)
fetch(RECORDS, ids)
local lost, cancelled, held = {}, {}, {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if lease_of(id) == token then
    held[#held + 1] = deadline
    held[#held + 1] = id
    if field(get(RECORDS, id) or '', 'cancel') == '1' then
      cancelled[#cancelled + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
for first = 1, #held, 2 * BATCH do
  redis.call('ZADD', leases, 'XX', unpack(held, first, math.min(first + 2 * BATCH - 1, #held)))
end
return {lost, cancelled}
