-- Take back expired leases: each such task is ready again with attempt + 1, or
-- dead-lettered once its leases were lost too often, or CANCELLED if that was asked.
-- A lost lease is a lost *delivery* (the worker died or hung, perhaps before the task
-- even started), so it is not held against max_attempts, which bounds failures: with
-- retries=0 a crash still redelivers. A task whose worker is lost max(max_attempts, 3)
-- times is dead-lettered (a poison task that kills its worker cannot loop forever).
-- KEYS: leases, ready
-- ARGV: prefix, after_ms (added to the server's clock: tests look ahead), limit,
--       result_ttl_ms, max_dead
-- Returns {requeued ids}, {dead-lettered ids}, {cancelled ids}.
local leases, ready = KEYS[1], KEYS[2]
local prefix, limit, result_ttl_ms, max_dead = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local now = int(server_ms() + tonumber(ARGV[2]))
local requeued, dead, cancelled = {}, {}, {}
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit)
in_slices('ZREM', leases, expired)
fetch(RUNS, expired)
fetch(RECORDS, expired)
for _, id in ipairs(expired) do
  local _, lease = lease_of(id)
  local r = lease and record(id)
  if r then
    local attempt = (tonumber(r.attempt) or 0) + 1
    local lost = (tonumber(r.lost) or 0) + 1
    r.attempt, r.lost = attempt, lost
    put(RUNS, id, false)
    release_limits(prefix, lease, false) -- the attempt may have started: its tokens are spent
    local max_lost = math.max(tonumber(r.max) or 0, 3)
    if r.cancel then
      local outcome = outcome_json(id, 'cancelled', attempt, {kind = 'cancelled', reason = 'cancelled'})
      finish(prefix, id, outcome, result_ttl_ms)
      cancelled[#cancelled + 1] = id
    elseif lost >= max_lost then
      local reason = 'its worker was lost (lease expired) ' .. lost .. ' times, the most allowed'
      local error_fields = {kind = 'failed', type = 'LeaseExpired', message = reason}
      save(id, r)
      bury(prefix, id, outcome_json(id, 'failed', attempt, error_fields, reason), reason, max_dead)
      dead[#dead + 1] = id
    else
      make_ready(prefix, id, r, tonumber(now))
      requeued[#requeued + 1] = id
    end
  end
end
flush()
if #requeued > 0 then
  wake(prefix)
end
return {requeued, dead, cancelled}
