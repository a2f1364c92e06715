-- alive: a node says it is up, timed by Redis's clock (hosts' clocks may disagree), and whether
-- it is stopping (draining after --stop-after: up, but taking no new command).
-- KEYS: alive stopping; ARGV: node stopping(0|1)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now, ARGV[1])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], ARGV[1], now)
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
