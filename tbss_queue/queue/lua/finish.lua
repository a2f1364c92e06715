-- finish: record the outcome of an attempt, for the lease's owner only.
-- Each recorded attempt is also one line of the batch's run log (what the report reads: line,
-- node, slot, start, end and state, without decoding a record), and a failed command joins the
-- batch's failed set (what `failures` reads).
-- The last outcome of a batch ends it in this same step (ending.lua).
-- KEYS: state counts nodes running lease result ended meta runs failed [ending: from 11]
-- ARGV: cid member node token new_state record_json duration run_line ('': nothing ran)
--       batch_id default_ttl peak_rss ('' unknown: the most an attempt's tree held)
-- Returns 'ok'; 'not-owner' (the lease was lost: nothing is recorded); 'forgotten' (the batch
-- is gone: only the lease is let go); or the state the command was in when it was no longer
-- running (cancelled meanwhile: it stays cancelled).
local rec = redis.call('HGET', KEYS[4], ARGV[2])
if not rec or cjson.decode(rec)['token'] ~= ARGV[4] then return 'not-owner' end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
if gone(KEYS[8]) then return 'forgotten' end
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|running', -1)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[3], ARGV[3] .. '|seen', now)
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old ~= 'running' then return old or 'unknown' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
redis.call('HSET', KEYS[6], ARGV[1], ARGV[6])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|' .. ARGV[5], 1)
redis.call('HINCRBYFLOAT', KEYS[3], ARGV[3] .. '|busy', ARGV[7])
redis.call('HSET', KEYS[8], 'last_ended', now)
local peak = tonumber(ARGV[11] or '')
if peak and peak > tonumber(redis.call('HGET', KEYS[8], 'peak_rss') or '0') then
  redis.call('HSET', KEYS[8], 'peak_rss', peak)  -- the batch's largest attempt (status)
end
if ARGV[8] ~= '' then redis.call('RPUSH', KEYS[9], ARGV[8] .. '\t' .. ARGV[5]) end
if ARGV[5] == 'failed' then redis.call('SADD', KEYS[10], ARGV[1]) end
end_if_idle(11, ARGV[9], ARGV[10])
return 'ok'
