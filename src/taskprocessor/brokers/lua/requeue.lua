-- Move a dead letter back to the queue with a fresh attempt count.
-- KEYS: dead, ready
-- ARGV: prefix, id, now_ms, reply ('' = keep)
-- Returns the task body, or nil when no dead letter has that id.
local dead, ready = KEYS[1], KEYS[2]
local prefix, id, now, reply = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', dead, id) then
  return nil
end
redis.call('ZREM', dead, id)
local body = get(BODIES, id)
local r = record(id)
if not body or not r then
  drop(id)
  flush()
  return nil
end
r.cancel, r.score, r.watch = nil, nil, nil
r.attempt = 0
if reply ~= '' then
  r.reply = reply
end
put(ENDS, id, false)
put(RUNS, id, false)
make_ready(prefix, id, r, tonumber(now))
flush()
redis.call('HINCRBY', prefix .. 'stats', 'enqueued', 1)
wake(prefix)
return body
