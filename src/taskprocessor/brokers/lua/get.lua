-- Read a task, and subscribe the caller to its outcome while it is not final.
-- KEYS: the records hash (routes the call to its slot). ARGV: prefix, id, channel ('' = do not watch).
-- Returns {state, body, attempt, outcome, dead_reason}, or nil when unknown.
local id, channel = ARGV[2], ARGV[3]
local r = load(id)
if not r or not r.state then
  return nil
end
if channel ~= '' and not FINAL[r.state] then
  local watchers = r.watch or ''
  if not string.find(' ' .. watchers .. ' ', ' ' .. channel .. ' ', 1, true) then
    r.watch = watchers .. ' ' .. channel
    save(id, r)
    flush()
  end
end
return {r.state, redis.call('HGET', BODIES, id) or '', tostring(r.attempt or 0), r.outcome or '', r.dead or ''}
