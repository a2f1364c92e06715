-- late: a runner of NODE stopped its command because its lease could not be renewed in time (the
-- machine or the runner was paused, overloaded, or cut off from Redis). The command is not at
-- fault and goes back to the queue unfailed; the node is, once it happens `limit` times within
-- `window` seconds: it is quarantined, and stays so until `nodes resume` or its restart.
-- KEYS: late quarantine
-- ARGV: node limit window_seconds reason_json
-- Returns {losses counted in the window, 1 if the node is quarantined now else 0}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local late = {n = 0, since = now}
if raw then late = cjson.decode(raw) end
if now - late['since'] > tonumber(ARGV[3]) then late = {n = 0, since = now} end
late['n'] = late['n'] + 1
if late['n'] < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(late))
  return {late['n'], 0}
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
return {late['n'], 1}
