-- end: a batch with nothing queued or running (and nothing pending to apply) has ended: it
-- leaves the active set and every key of it expires after the retention time. A later
-- resubmission or retry makes it active again and its keys permanent (commit).
-- KEYS: active pending meta counts [the batch's other keys]
-- ARGV: batch_id ttl_seconds
-- Returns 1 if the batch ended now, 0 if it is still active (or was not).
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local c = redis.call('HMGET', KEYS[4], 'queued', 'running')
if tonumber(c[1] or '0') > 0 or tonumber(c[2] or '0') > 0 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[3], 'ended_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
