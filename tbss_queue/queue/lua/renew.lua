-- renew: extend a running command's lease, for its current owner only (fencing by token).
-- KEYS: state running lease
-- ARGV: cid member token lease_ms
-- Returns 'ok'; 'cancelled' (stop the command, then release); 'lost' (another runner owns it,
-- or nobody: stop at once and record nothing).
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec or cjson.decode(rec)['token'] ~= ARGV[3] then return 'lost' end
local state = redis.call('HGET', KEYS[1], ARGV[1])
if state == 'cancelled' then return 'cancelled' end
if state ~= 'running' then return 'lost' end
-- an owner whose key lapsed may renew as long as nobody took the command (the reaper's
-- requeue and this script are atomic with respect to each other). PEXPIRE first: unlike SET it
-- is allowed in a Redis that is out of memory, so running commands keep their leases then.
if redis.call('PEXPIRE', KEYS[3], ARGV[4]) == 0 then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
end
return 'ok'
