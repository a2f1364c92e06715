-- release: take a command from the runner holding lease `token` and queue it again; or fail it
-- as `lost` once its runners were lost `limit` times. Used by an owner handing its command back
-- (shutdown, node fault) and by the reaper for a lapsed lease. Only that runner's own lease is
-- released, so two reapers can't both requeue.
-- A command failed as lost may be the last outcome of its batch: it ends it (ending.lua).
-- A requeued command is owed a message from `delay` seconds on (owed): whoever requeued it
-- publishes one and pays the debt in the same step; if its reply to this script was lost, or it
-- died first, a reaper finds the debt and publishes the message (recovery.republish_owed).
-- KEYS: state counts nodes running lease attempts result ended failed owed runs [ending: from
--       12, its meta at 14]
-- ARGV: cid member token limit count_loss ignore_lease batch_id default_ttl delay
--       record_json ('' none: the attempt's record, kept with the requeue in the same step)
--       run_line ('' none: the attempt ran and failed, and is retried: its line in the run log)
--       oom_limit (0: none; else the kernel killed it for memory: counted once per node in
--       attempts 'oom:CID', and failed as `oom` with record_json on the oom_limit-th node)
-- Returns 'requeued', 'lost', 'oom', 'alive' (the lease is still held) or 'gone' (released, but the
-- command was no longer running: cancelled, or already taken, or its batch forgotten).
-- Counts every requeue in attempts ('requeued', and 'lost' for lost runners) and per node
-- (nodes 'NODE|requeued'), for status.
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if not rec then return 'gone' end
local r = cjson.decode(rec)
if r['token'] ~= ARGV[3] then return 'gone' end
if ARGV[6] == '0' and redis.call('EXISTS', KEYS[5]) == 1 then return 'alive' end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
if gone(KEYS[14]) then return 'gone' end
redis.call('HINCRBY', KEYS[3], r['node'] .. '|running', -1)
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old ~= 'running' then return 'gone' end
local lost = 0
if ARGV[5] == '1' then
  lost = redis.call('HINCRBY', KEYS[6], 'lost:' .. ARGV[1], 1)
  redis.call('HINCRBY', KEYS[6], 'lost', 1)
end
local oom = 0
local oom_limit = tonumber(ARGV[12] or '0') or 0
if oom_limit > 0 then
  if redis.call('HSETNX', KEYS[6], 'oom:' .. ARGV[1] .. '|' .. r['node'], 1) == 1 then
    oom = redis.call('HINCRBY', KEYS[6], 'oom:' .. ARGV[1], 1)
  else
    oom = tonumber(redis.call('HGET', KEYS[6], 'oom:' .. ARGV[1]) or '0')
  end
  redis.call('HINCRBY', KEYS[6], 'oom', 1)
end
local new = 'queued'
if lost >= tonumber(ARGV[4]) or (oom_limit > 0 and oom >= oom_limit) then new = 'failed' end
redis.call('HSET', KEYS[1], ARGV[1], new)
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], new, 1)
if oom_limit > 0 then
  local peak = tonumber(cjson.decode(ARGV[10])['peak_rss'] or 0) or 0
  if peak > tonumber(redis.call('HGET', KEYS[14], 'peak_rss') or '0') then
    redis.call('HSET', KEYS[14], 'peak_rss', peak)
  end
end
if new == 'failed' and oom_limit > 0 then
  local failed = cjson.decode(ARGV[10])
  failed['message'] = failed['message'] .. '; killed so on ' .. oom .. ' nodes (limit ' ..
    oom_limit .. ')'
  redis.call('HSET', KEYS[7], ARGV[1], cjson.encode(failed))
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[8], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
  redis.call('SADD', KEYS[9], ARGV[1])
  redis.call('HINCRBY', KEYS[3], r['node'] .. '|failed', 1)
  if ARGV[11] ~= '' then redis.call('RPUSH', KEYS[11], ARGV[11] .. '\tfailed') end
  end_if_idle(12, ARGV[7], ARGV[8])
  return 'oom'
end
if new == 'failed' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local msg = 'worker lost ' .. lost .. ' times while running it (last: ' .. r['node'] ..
    '); crash limit reached'
  redis.call('HSET', KEYS[7], ARGV[1], cjson.encode({cause='lost', message=msg,
    node=r['node'], exit_code=cjson.null, started=r['started'], ended=now,
    duration=now - r['started'], stdout_tail='', stderr_tail=msg}))
  redis.call('ZADD', KEYS[8], now, ARGV[1])
  redis.call('SADD', KEYS[9], ARGV[1])
  redis.call('HINCRBY', KEYS[3], r['node'] .. '|failed', 1)
  end_if_idle(12, ARGV[7], ARGV[8])
  return 'lost'
end
redis.call('HINCRBY', KEYS[6], 'requeued', 1)
redis.call('HINCRBY', KEYS[3], r['node'] .. '|requeued', 1)
if ARGV[10] ~= '' then redis.call('HSET', KEYS[7], ARGV[1], ARGV[10]) end
if ARGV[11] ~= '' then redis.call('RPUSH', KEYS[11], ARGV[11] .. '\tfailed') end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[10], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[9]), ARGV[2])
return 'requeued'
