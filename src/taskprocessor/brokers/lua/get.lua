-- Read a task, and subscribe the caller to its outcome while it is not final.
-- KEYS: the records hash (routes the call to its slot). ARGV: prefix, id, channel ('' = do not watch).
-- Returns {state, body, attempt, outcome, dead_reason}, or nil when unknown.
local id, channel = ARGV[2], ARGV[3]
local state = state_of(id)
if not state or state == '' then
  return nil
end
local r = record(id) or {}
local e = FINAL[state] and ending(id)
if channel ~= '' and not e then
  local watchers = r.watch or ''
  if not string.find(' ' .. watchers .. ' ', ' ' .. channel .. ' ', 1, true) then
    r.watch = watchers .. ' ' .. channel
    save(id, r)
    flush()
  end
end
local attempt = e and string.match(e.outcome, '"attempt":%s*(%d+)') or tostring(r.attempt or 0)
return {state, get(BODIES, id) or '', attempt, e and e.outcome or '', e and e.dead or ''}
