-- Delete every dead letter of a queue. KEYS: dead. ARGV: prefix. Returns the count.
local dead, prefix = KEYS[1], ARGV[1]
local ids = redis.call('ZRANGE', dead, 0, -1)
for _, id in ipairs(ids) do
  redis.call('DEL', task_key(prefix, id))
end
redis.call('DEL', dead)
return #ids
