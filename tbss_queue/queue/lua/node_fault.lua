-- node_fault: the owner of a command could not start it for a reason of its node (working
-- directory missing, executable not found, refused by its policy). The command goes back to the
-- queue unfailed, and the node keeps taking other work: the fault is recorded for its scope
-- alone (faults: "node|scope" -> reason; scope: the path whose absence is the fault, or the
-- refusal itself), where `nodes` and `status` show it and the node re-checks it by itself.
-- Unless every node that is taking commands has now refused this command: then the fault is
-- the command's, and it fails with each node's reason, once.
-- A command failed here may be the last outcome of its batch: it ends it (ending.lua).
-- A command requeued here is owed a message (owed; see release.lua).
-- KEYS: state counts nodes running lease result ended refusals alive quarantine failed owed
--       faults [ending: from 14, its meta at 16]
-- ARGV: cid member node token reason_json live_window_seconds batch_id default_ttl
--       again_delay (seconds before a command this node refused before is owed its message:
--       another node comes to it first)
-- Returns 'requeued' (refused here for the first time), 'again' (this node had refused it
-- before), 'failed', 'gone' (no longer running, or its batch forgotten) or 'not-owner'.
-- a fault's scope: the path whose appearance ends it, else the refusal itself
local function scope(r)
  if r['path'] == nil or r['path'] == cjson.null then return r['message'] end
  return r['path']
end
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if not rec or cjson.decode(rec)['token'] ~= ARGV[4] then return 'not-owner' end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
if gone(KEYS[16]) then return 'gone' end
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|running', -1)
-- cancelled (and perhaps ended) meanwhile: nothing of it is written, no key of an ended batch
-- made again without its TTL
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 'gone' end
local reason = cjson.decode(ARGV[5])
local raw = redis.call('HGET', KEYS[8], ARGV[1])
local refused = {}
if raw then refused = cjson.decode(raw) end
local again = refused[ARGV[3]] ~= nil
refused[ARGV[3]] = reason
redis.call('HSET', KEYS[8], ARGV[1], cjson.encode(refused))
redis.call('HSET', KEYS[13], ARGV[3] .. '|' .. scope(reason), ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local every = true
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], now - tonumber(ARGV[6]), '+inf')) do
  -- a node refuses it still only while its fault stands (a study mounted since: it may run it)
  local still = refused[node] and
    redis.call('HEXISTS', KEYS[13], node .. '|' .. scope(refused[node])) == 1
  if node ~= ARGV[3] and not still and redis.call('HEXISTS', KEYS[10], node) == 0 then
    every = false
    break
  end
end
redis.call('HINCRBY', KEYS[2], 'running', -1)
if not every then
  redis.call('HSET', KEYS[1], ARGV[1], 'queued')
  redis.call('HINCRBY', KEYS[2], 'queued', 1)
  if again then
    redis.call('ZADD', KEYS[12], now + tonumber(ARGV[9]), ARGV[2])
    return 'again'
  end
  redis.call('ZADD', KEYS[12], now, ARGV[2])
  return 'requeued'
end
local parts, names = {}, {}
for node, r in pairs(refused) do table.insert(names, node) end
table.sort(names)
for _, node in ipairs(names) do
  table.insert(parts, node .. ': ' .. refused[node]['message'])
  -- the command's fault, not theirs: their records of it go
  redis.call('HDEL', KEYS[13], node .. '|' .. scope(refused[node]))
end
local msg = reason['message'] .. ' - refused by every node taking commands (' ..
  table.concat(parts, '; ') .. ')'
redis.call('HSET', KEYS[1], ARGV[1], 'failed')
redis.call('HINCRBY', KEYS[2], 'failed', 1)
redis.call('SADD', KEYS[11], ARGV[1])
redis.call('HSET', KEYS[6], ARGV[1], cjson.encode({cause=reason['cause'], message=msg,
  node=ARGV[3], exit_code=cjson.null, started=now, ended=now, duration=0, stdout_tail='',
  stderr_tail=msg, refusals=refused}))
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|failed', 1)
end_if_idle(14, ARGV[7], ARGV[8])
return 'failed'
