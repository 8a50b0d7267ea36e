-- Move a dead letter back to the queue with a fresh attempt count.
-- KEYS: task hash, dead, ready
-- ARGV: prefix, id, now_ms, reply ('' = keep)
-- Returns the task body, or nil when no dead letter has that id.
local h, dead, ready = KEYS[1], KEYS[2], KEYS[3]
local prefix, id, now, reply = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not redis.call('ZSCORE', dead, id) then
  return nil
end
redis.call('ZREM', dead, id)
local body = redis.call('HGET', h, 'body')
if not body then
  redis.call('DEL', h)
  return nil
end
redis.call('HDEL', h, 'outcome', 'dead', 'cancel', 'token', 'score', 'watch')
redis.call('HSET', h, 'attempt', 0)
if reply ~= '' then
  redis.call('HSET', h, 'reply', reply)
end
make_ready(prefix, h, id, tonumber(now))
redis.call('HINCRBY', prefix .. 'stats', 'enqueued', 1)
wake(prefix)
return body
