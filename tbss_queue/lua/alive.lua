-- alive: a node says it is up, timed by Redis's clock (hosts' clocks may disagree).
-- KEYS: alive; ARGV: node
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
return 1
