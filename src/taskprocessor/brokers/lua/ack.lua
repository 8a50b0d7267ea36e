-- Record the final states of reserved tasks of one queue, each fenced by its lease token.
-- KEYS: leases
-- ARGV: prefix, result_ttl_ms, max_dead, acks: a JSON array of
--       [id, token, state, outcome, dead_reason ('' = none)]
-- Returns one reply per ack, in order: {1, dropped dead letter ids...} when recorded,
-- {2, state} when this very lease already recorded it (a repeated call), {0, state}
-- when the token is stale.
-- The leases and records of the call are read with one HMGET each, the ends written with
-- one HSET and the leases deleted with one HDEL; the lease removals, the expiries, the
-- finished count and the outcome messages (one per reply channel, the outcomes joined
-- by newlines) go once per call too. No record is decoded (see channels_of).
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
fetch(RUNS, ids)
fetch(RECORDS, ids)
for i, ack in ipairs(acks) do
  local id, token, outcome, dead_reason = ack[1], ack[2], ack[4], ack[5]
  local held, lease = lease_of(id)
  if held ~= token then
    -- Not (or no longer) this lease's: recorded by it already (a repeated call), or stale.
    fetch(ENDS, ids)
    local state = state_of(id)
    local e = state and FINAL[state] and ending(id)
    replies[i] = {e and e.token == token and 2 or 0, state or ''}
  else
    ended[#ended + 1] = id
    release_limits(prefix, lease, false)
    if dead_reason ~= '' then
      replies[i] = {1, unpack(bury(prefix, id, outcome, dead_reason, max_dead, token))}
    else
      local reply, watchers = channels_of(id)
      if keep then
        record_end(id, outcome, result_ttl_ms, '', token)
      else
        drop(id)
      end
      finished = finished + 1
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
