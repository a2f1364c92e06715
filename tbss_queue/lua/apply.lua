-- apply: one bounded step of a committed submission. First its staged changes, one chunk per
-- call: a command changes only if it is still in the state the submitter read (`expect`), so a
-- command that started or finished meanwhile is left alone (its extra message is dropped by the
-- claim). Then its messages, at most `limit` per call, in file order. Any number of callers may
-- drive it (the submitter, or a reaper when the submitter died): each step happens once.
-- KEYS: pending state counts cmd meta s_msgs queue s_cmd s_state s_expect failed
--       (the s_* chunk keys are those of chunk `step`)
-- ARGV: batch_id sid step limit
-- Returns 'more', 'done', or 'stale' (the pending record is not at `step`: read it again).
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'done' end
local p = cjson.decode(raw)
if p['sid'] ~= ARGV[2] or p['next'] ~= tonumber(ARGV[3]) then return 'stale' end
if p['next'] < p['chunks'] then
  local kv = redis.call('HGETALL', KEYS[8])
  for i = 1, #kv, 2 do redis.call('HSET', KEYS[4], kv[i], kv[i + 1]) end
  local st = redis.call('HGETALL', KEYS[9])
  for i = 1, #st, 2 do
    local old = redis.call('HGET', KEYS[2], st[i])
    local expect = redis.call('HGET', KEYS[10], st[i]) or ''
    if (old or '') == expect then
      if old then redis.call('HINCRBY', KEYS[3], old, -1) end
      if old == 'failed' then redis.call('SREM', KEYS[11], st[i]) end
      redis.call('HSET', KEYS[2], st[i], st[i + 1])
      redis.call('HINCRBY', KEYS[3], st[i + 1], 1)
    end
  end
  redis.call('UNLINK', KEYS[8], KEYS[9], KEYS[10])
  p['next'] = p['next'] + 1
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(p))
  return 'more'
end
local limit = tonumber(ARGV[4])
local moved = 0
while moved < limit and redis.call('LMOVE', KEYS[6], KEYS[7], 'RIGHT', 'LEFT') do
  moved = moved + 1
end
if redis.call('EXISTS', KEYS[6]) == 1 then return 'more' end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[5], 'total', redis.call('HLEN', KEYS[2]))
return 'done'
