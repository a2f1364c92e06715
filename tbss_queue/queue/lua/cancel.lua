-- cancel: one bounded step of cancelling a batch. Every queued or running command among the
-- next `count` entries of the state hash (HSCAN from `cursor`) becomes cancelled; the caller
-- repeats until the cursor is back at 0 (HSCAN returns every entry present for the whole scan
-- at least once). Leases stay with their runners, which see `cancelled` at their next renewal,
-- kill their command and release it; a lease whose runner is gone lapses and the reaper
-- releases it. No message is revoked: a queued command's message is dropped by the claim.
-- Its last step ends the batch (ending.lua): nothing is queued or running any more.
-- KEYS: state counts meta [ending: from 4]
-- ARGV: cursor count batch_id default_ttl
-- Returns {next cursor, commands cancelled by this step}, or {'pending', 0}: a submission of
-- the batch is committed and its changes not yet applied (its submitter may have died): apply
-- them (not yet its messages), then cancel, or the commands it queues would run after the
-- cancel said they were cancelled. Its messages, moved after, are dropped by the claims.
local pending = redis.call('HGET', KEYS[5], ARGV[3])
if pending then
  local p = cjson.decode(pending)
  if p['next'] < p['chunks'] then return {'pending', 0} end
end
if ARGV[1] == '0' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[3], 'cancelled_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
end
local scan = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local st = scan[2]
local n = 0
for i = 1, #st, 2 do
  local old = st[i + 1]
  if old == 'queued' or old == 'running' then
    redis.call('HSET', KEYS[1], st[i], 'cancelled')
    redis.call('HINCRBY', KEYS[2], old, -1)
    redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
    n = n + 1
  end
end
if scan[1] == '0' then
  -- every command marked: a submission committed to be cancelled may move its messages now
  -- (the claims drop them)
  local raw = redis.call('HGET', KEYS[5], ARGV[3])
  if raw then
    local p = cjson.decode(raw)
    if p['cancel'] then
      p['cancel'] = nil
      redis.call('HSET', KEYS[5], ARGV[3], cjson.encode(p))
    end
  end
  end_if_idle(4, ARGV[3], ARGV[4])
end
return {scan[1], n}
