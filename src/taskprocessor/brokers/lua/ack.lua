-- Record the final states of reserved tasks of one queue, each fenced by its lease token.
-- KEYS: leases
-- ARGV: prefix, result_ttl_ms, max_dead, acks: a JSON array of
--       [id, token, state, outcome, dead_reason ('' = none)]
-- Returns one reply per ack, in order: {1, dropped dead letter ids...} when recorded,
-- {2, state} when this very lease already recorded it (a repeated call), {0, state}
-- when the token is stale.
-- The leases and records of the call are read with one HMGET each, the ends written with
-- one HSET and the leases deleted with one HDEL; the lease removals, the expiry entry,
-- the finished count and the outcome messages (one per reply channel, the outcomes
-- joined by newlines) go once per call too. No record is decoded: the reply channels
-- are found in it (see field in _common.lua).
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

-- The hot path works on plain arrays: no per-task table but the reply.
local count = #acks
local ids = {}
for i = 1, count do
  ids[i] = acks[i][1]
end
local leased, raws = read_two(ids, RUNS, RECORDS)
local done, gone, exp = {}, {}, keep and int(clock() + tonumber(result_ttl_ms)) or nil
local acked = {} -- id -> {token, state} recorded by this call (an id may come twice)
for i = 1, count do
  local ack = acks[i]
  local id, token, outcome, dead_reason = ids[i], ack[2], ack[4], ack[5]
  local lease = leased[i]
  local mine = lease and string.sub(lease, 1, #token + 1) == token .. '\n'
  if acked[id] then
    replies[i] = {acked[id][1] == token and 2 or 0, acked[id][2]}
  elseif not mine then
    -- Not (or no longer) this lease's: recorded by it already (a repeated call), or stale.
    RUNS.seen[id], RECORDS.seen[id] = lease or false, raws[i] or false
    fetch(ENDS, {id})
    local state = state_of(id)
    local e = state and FINAL[state] and ending(id)
    replies[i] = {e and e.token == token and 2 or 0, state or ''}
  else
    acked[id] = {token, ack[3]}
    ended[#ended + 1] = id
    if string.find(lease, '\n', #token + 2, true) then
      release_limits(prefix, lease, false)
    end
    if dead_reason ~= '' then
      RUNS.seen[id], RECORDS.seen[id] = lease, raws[i] or false
      replies[i] = {1, unpack(bury(prefix, id, outcome, dead_reason, max_dead, token))}
    else
      local raw = raws[i]
      local reply, watchers
      if raw then
        if string.find(raw, '\\', 1, true) then
          RECORDS.seen[id] = raw
          local r = record(id) -- an escaped character somewhere: let cjson read it
          reply, watchers = r.reply, r.watch
        else
          reply, watchers = field(raw, 'reply'), field(raw, 'watch')
        end
      end
      if keep then
        done[#done + 1] = id
        done[#done + 1] = exp .. '\n' .. token .. '\n' .. outcome .. '\n'
        expiring[#expiring + 1] = id
      else
        gone[#gone + 1] = id
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
if #expiring > 0 then
  expiring_at = math.max(expiring_at or 0, tonumber(exp))
end
in_slices('HDEL', RUNS.key, ended)
in_slices('HSET', ENDS.key, done, 2)
if #gone > 0 then
  in_slices('HDEL', RECORDS.key, gone)
  in_slices('HDEL', BODIES.key, gone)
  in_slices('HDEL', ENDS.key, gone)
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
