-- Delete every dead letter of a queue. KEYS: dead. ARGV: prefix. Returns the count.
local dead = KEYS[1]
local ids = redis.call('ZRANGE', dead, 0, -1)
for _, id in ipairs(ids) do
  drop(id)
end
flush()
redis.call('DEL', dead)
return #ids
