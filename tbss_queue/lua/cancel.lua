-- cancel: every queued or running command of a batch becomes cancelled. Leases stay with their
-- runners, which see `cancelled` at their next renewal, kill their command and release it; a
-- lease whose runner is gone lapses and the reaper releases it. No message is revoked: a queued
-- command's message is dropped by the claim, whatever its id.
-- KEYS: state counts meta
-- ARGV: none
-- Returns the number of commands cancelled.
local st = redis.call('HGETALL', KEYS[1])
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
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], 'cancelled_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
return n
