-- Heartbeat: push back the lease deadlines of tasks this worker still holds.
-- KEYS: leases
-- ARGV: prefix, lease_ms, id1, token1, id2, token2, ...
-- Returns {lost ids}, {ids whose cancellation was requested}.
local leases = KEYS[1]
local prefix = ARGV[1]
local deadline = int(server_ms() + tonumber(ARGV[2]))
local lost, cancelled = {}, {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', task_key(prefix, id), 'state', 'token', 'cancel')
  if f[1] == 'running' and f[2] == token then
    redis.call('ZADD', leases, 'XX', deadline, id)
    if f[3] then
      cancelled[#cancelled + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancelled}
