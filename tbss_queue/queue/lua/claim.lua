-- claim: a queued command becomes running under one runner's lease.
-- KEYS: state counts nodes running lease attempts meta quarantine cmd
-- ARGV: cid member node token lease_ms pid attempt
-- Returns {'ok', attempt number, line} (the runner's log files and record need both, so they
-- come with the claim instead of a second round trip); 'busy' (running elsewhere: a duplicate message); a final state;
-- 'leased' (queued again, but the runner of an earlier attempt has not let go yet: wait);
-- 'quarantined' (this node takes no command: hand the message back unclaimed);
-- 'unknown'. A running command is never taken over here: only the reaper decides a lease lapsed.
local function numbered(attempt)
  local spec = redis.call('HGET', KEYS[9], ARGV[1])
  local line = spec and cjson.decode(spec)['line'] or 0
  return {'ok', attempt, line}
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 'unknown' end
if old ~= 'queued' and old ~= 'running' then return old end
if old == 'running' then
  -- this runner's own claim, tried again after its reply was lost (a dropped connection, a
  -- failover): it holds the command already
  local mine = redis.call('HGET', KEYS[4], ARGV[2])
  if mine and cjson.decode(mine)['token'] == ARGV[4] then
    -- and its lease starts again from now, as the runner's own clock does
    if redis.call('PEXPIRE', KEYS[5], ARGV[5]) == 0 then
      redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
    end
    return numbered(tonumber(redis.call('HGET', KEYS[6], ARGV[1]) or 1))
  end
  return 'busy'
end
if redis.call('HEXISTS', KEYS[8], ARGV[3]) == 1 then return 'quarantined' end
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if rec then
  if redis.call('EXISTS', KEYS[5]) == 1 then return 'leased' end
  -- the lease of a runner that is gone (cancelled, then queued again): let it go
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('HINCRBY', KEYS[3], cjson.decode(rec)['node'] .. '|running', -1)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], ARGV[1], 'running')
redis.call('HINCRBY', KEYS[2], 'queued', -1)
redis.call('HINCRBY', KEYS[2], 'running', 1)
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|running', 1)
redis.call('HSET', KEYS[3], ARGV[3] .. '|seen', now)
redis.call('HSET', KEYS[4], ARGV[2], cjson.encode({node=ARGV[3], token=ARGV[4], started=now,
  pid=tonumber(ARGV[6]), attempt=ARGV[7]}))
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
local attempt = redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
redis.call('HSETNX', KEYS[7], 'first_started', now)
return numbered(attempt)
