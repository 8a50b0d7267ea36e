-- Record a reserved task's final state, fenced by its lease token.
-- KEYS: task hash, leases
-- ARGV: prefix, id, token, state, outcome, result_ttl_ms, dead_reason ('' = none), max_dead
-- Returns {1, dropped dead letter ids...} when recorded, {2, state} when this very
-- lease already recorded it (a repeated call), {0, state} when the token is stale.
local h, leases = KEYS[1], KEYS[2]
local prefix, id, token, state, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local result_ttl_ms, dead_reason, max_dead = ARGV[6], ARGV[7], ARGV[8]

local f = redis.call('HMGET', h, 'state', 'token')
if f[2] ~= token then
  return {0, f[1] or ''}
end
if f[1] ~= 'running' then
  if FINAL[f[1]] then
    return {2, f[1]}
  end
  return {0, f[1]}
end
redis.call('ZREM', leases, id)
release_limits(prefix, h, false)
if dead_reason ~= '' then
  local dropped = bury(prefix, h, id, state, outcome, dead_reason, max_dead)
  return {1, unpack(dropped)}
end
finish(prefix, h, state, outcome, result_ttl_ms)
return {1}
