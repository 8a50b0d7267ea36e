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
load_many(ids)
local lost, cancelled, held = {}, {}, {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local r = load(id)
  if r and r.state == 'running' and r.token == token then
    held[#held + 1] = deadline
    held[#held + 1] = id
    if r.cancel then
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
