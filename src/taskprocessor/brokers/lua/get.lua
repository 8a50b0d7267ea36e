-- Read a task, and subscribe the caller to its outcome while it is not final.
-- KEYS: task hash. ARGV: channel ('' = do not watch).
-- Returns {state, body, attempt, outcome, dead_reason}, or nil when unknown.
local h, channel = KEYS[1], ARGV[1]
local f = redis.call('HMGET', h, 'state', 'body', 'attempt', 'outcome', 'dead', 'watch')
if not f[1] then
  return nil
end
if channel ~= '' and not FINAL[f[1]] then
  local watchers = f[6] or ''
  if not string.find(' ' .. watchers .. ' ', ' ' .. channel .. ' ', 1, true) then
    redis.call('HSET', h, 'watch', watchers .. ' ' .. channel)
  end
end
return {f[1], f[2] or '', f[3] or '0', f[4] or '', f[5] or ''}
