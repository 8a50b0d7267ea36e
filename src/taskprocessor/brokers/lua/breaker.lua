-- A shared circuit breaker changed state in one worker: mark it open on this queue, so
-- every worker's claim holds its task types back until the key expires, or closed.
-- KEYS: the breaker's open key ({tp:q}:open:<breaker>)
-- ARGV: prefix, open_ms ('' = closed: delete the mark and wake an idle worker)
local key, prefix, open_ms = KEYS[1], ARGV[1], ARGV[2]
if open_ms == '' then
  if redis.call('DEL', key) == 1 then
    wake(prefix)
  end
  return 0
end
redis.call('SET', key, open_ms, 'PX', open_ms)
return 1
