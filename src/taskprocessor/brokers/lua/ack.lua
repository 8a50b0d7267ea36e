-- Record the final states of reserved tasks of one queue, each fenced by its lease token.
-- KEYS: leases
-- ARGV: prefix, result_ttl_ms, max_dead, acks: a JSON array of
--       [id, token, state, outcome, dead_reason ('' = none)]
-- Returns one reply per ack, in order: {1, dropped dead letter ids...} when recorded,
-- {2, state} when this very lease already recorded it (a repeated call), {0, state}
-- when the token is stale.
-- The records of the call are read with one HMGET and written with one HSET; the lease
-- removals, the expiries, the finished count and the outcome messages (one per reply
-- channel, the outcomes joined by newlines) go once per call too.
local leases = KEYS[1]
local prefix, result_ttl_ms, max_dead = ARGV[1], ARGV[2], ARGV[3]
local keep = tonumber(result_ttl_ms) > 0
local acks = cjson.decode(ARGV[4])
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

local ids = {}
for i, ack in ipairs(acks) do
  ids[i] = ack[1]
end
load_many(ids)
for i, ack in ipairs(acks) do
  local id, token, state, outcome, dead_reason = ack[1], ack[2], ack[3], ack[4], ack[5]
  local r = load(id)
  if not r or r.token ~= token then
    replies[i] = {0, r and r.state or ''}
  elseif r.state ~= 'running' then
    replies[i] = {FINAL[r.state] and 2 or 0, r.state}
  else
    ended[#ended + 1] = id
    release_limits(prefix, r, false)
    if dead_reason ~= '' then
      replies[i] = {1, unpack(bury(prefix, id, r, state, outcome, dead_reason, max_dead))}
    else
      r.state, r.outcome = state, outcome
      if keep then
        expire(id, r, result_ttl_ms)
      else
        drop(id)
      end
      finished = finished + 1
      local reply, watchers = r.reply, r.watch
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
in_slices('ZREM', leases, ended)
sweep()
flush()
if finished > 0 then
  redis.call('HINCRBY', prefix .. 'stats', 'finished', finished)
end
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, table.concat(messages[channel], '\n'))
end
return replies
