-- Record the final states of reserved tasks of one queue, each fenced by its lease token.
-- KEYS: leases
-- ARGV: prefix, result_ttl_ms, max_dead, acks: a JSON array of
--       [id, token, state, outcome, dead_reason ('' = none)]
-- Returns one reply per ack, in order: {1, dropped dead letter ids...} when recorded,
-- {2, state} when this very lease already recorded it (a repeated call), {0, state}
-- when the token is stale.
-- Per task it reads and writes the task hash once and sets its expiry; the lease
-- removals, the finished count and the outcome messages (one per reply channel, the
-- outcomes joined by newlines) go once per call.
local leases = KEYS[1]
local prefix, result_ttl_ms, max_dead = ARGV[1], ARGV[2], ARGV[3]
local keep = tonumber(result_ttl_ms) > 0
local replies, ended, channels, messages = {}, {}, {}, {}
local finished = 0

local function tell(channel, outcome)
  local list = messages[channel]
  if not list then
    list = {}
    messages[channel] = list
    channels[#channels + 1] = channel
  end
  list[#list + 1] = outcome
end

for i, ack in ipairs(cjson.decode(ARGV[4])) do
  local id, token, state, outcome, dead_reason = ack[1], ack[2], ack[3], ack[4], ack[5]
  local h = task_key(prefix, id)
  local f = redis.call('HMGET', h, 'state', 'token', 'reply', 'watch', unpack(LIMIT_FIELDS))
  if f[2] ~= token then
    replies[i] = {0, f[1] or ''}
  elseif f[1] ~= 'running' then
    replies[i] = {FINAL[f[1]] and 2 or 0, f[1]}
  else
    ended[#ended + 1] = id
    if f[5] or f[6] or f[7] or f[8] then
      release_limits(prefix, h, false)
    end
    if dead_reason ~= '' then
      replies[i] = {1, unpack(bury(prefix, h, id, state, outcome, dead_reason, max_dead))}
    else
      redis.call('HSET', h, 'state', state, 'outcome', outcome)
      if keep then
        redis.call('PEXPIRE', h, result_ttl_ms)
      else
        redis.call('DEL', h)
      end
      finished = finished + 1
      local reply, watchers = f[3], f[4]
      if reply then
        tell(reply, outcome)
      end
      if watchers then
        for channel in string.gmatch(watchers, '%S+') do
          if channel ~= reply then
            tell(channel, outcome)
          end
        end
      end
      replies[i] = {1}
    end
  end
end
for first = 1, #ended, 1000 do
  redis.call('ZREM', leases, unpack(ended, first, math.min(first + 999, #ended)))
end
if finished > 0 then
  redis.call('HINCRBY', prefix .. 'stats', 'finished', finished)
end
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, table.concat(messages[channel], '\n'))
end
return replies
