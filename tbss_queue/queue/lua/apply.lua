-- apply: one bounded step of a committed submission. First its staged changes, one chunk per
-- call: a command changes only if it is still in the state the submitter read (`expect`), so a
-- command that started or finished meanwhile is left alone (its extra message is dropped by the
-- claim). In the same step, each command of the chunk that is queued now takes its entry in the
-- command index, unless the entry names another batch in which that command is queued, running
-- or succeeded: then it is skipped here ("already queued in batch X"), decided in this one
-- atomic step whichever submission, of the same file or another, got there first. Then its
-- messages, at most `limit` per call, in file order (a skipped command's message is dropped by
-- the claim). Any number of callers may drive it (the submitter, or a reaper when the
-- submitter died): each step happens once.
-- With `only_states`, it stops before the messages ('states'): a cancel marks the commands
-- first, and their messages, moved later, are dropped by the claims. The last step ends the
-- batch if nothing is left to run (ending.lua).
-- KEYS: pending state counts cmd meta s_msgs queue s_cmd s_state s_expect failed s_keys
--       [ending: from 13] (the s_* chunk keys are those of chunk `step`)
-- ARGV: batch_id sid step limit index_prefix index_digits id_namespace (16 bytes) batch_prefix
--       only_states ('1' or '0') default_ttl
-- Returns 'more', 'done', 'states' (only_states: every change is applied, the messages wait) or
-- 'stale' (the pending record is not at `step`: read it again), followed by ':N' when N
-- commands of this step were found queued in another batch.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 'done' end
local p = cjson.decode(raw)
if p['sid'] ~= ARGV[2] or p['next'] ~= tonumber(ARGV[3]) then return 'stale' end
local LIVE = {queued = true, running = true, succeeded = true}

-- task_id_for(batch, key) of batches.py: the first 16 hex digits of a UUID 5
local function task_id_for(batch, key)
  local h = redis.sha1hex(ARGV[7] .. batch .. '|' .. key)
  return h:sub(1, 12) .. '5' .. h:sub(14, 16)
end

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
  local skipped = 0
  local keyed = redis.call('HGETALL', KEYS[12])
  for i = 1, #keyed, 2 do
    local tid, key = keyed[i], keyed[i + 1]
    if redis.call('HGET', KEYS[2], tid) == 'queued' then
      local bucket = ARGV[5] .. key:sub(1, tonumber(ARGV[6]))
      local other = redis.call('HGET', bucket, key)
      local there = nil
      if other and other ~= ARGV[1] then
        there = redis.call('HGET', ARGV[8] .. other .. ':state', task_id_for(other, key))
      end
      if there and LIVE[there] then
        redis.call('HSET', KEYS[2], tid, 'skipped')
        redis.call('HINCRBY', KEYS[3], 'queued', -1)
        redis.call('HINCRBY', KEYS[3], 'skipped', 1)
        local spec = cjson.decode(redis.call('HGET', KEYS[4], tid))
        spec['note'] = 'already ' .. there .. ' in batch ' .. other
        redis.call('HSET', KEYS[4], tid, cjson.encode(spec))
        skipped = skipped + 1
      else
        redis.call('HSET', bucket, key, ARGV[1])
      end
    end
  end
  redis.call('UNLINK', KEYS[8], KEYS[9], KEYS[10], KEYS[12])
  p['next'] = p['next'] + 1
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(p))
  if skipped > 0 then return 'more:' .. skipped end
  return 'more'
end
-- a submission committed to be cancelled (a held batch cancelled, or whose dependency was never
-- satisfied) stops here for every caller until cancel.lua has marked it
if ARGV[9] == '1' or p['cancel'] then return 'states' end
local limit = tonumber(ARGV[4])
local moved = 0
while moved < limit and redis.call('LMOVE', KEYS[6], KEYS[7], 'RIGHT', 'LEFT') do
  moved = moved + 1
end
if redis.call('EXISTS', KEYS[6]) == 1 then return 'more' end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[5], 'total', redis.call('HLEN', KEYS[2]))
end_if_idle(13, ARGV[1], ARGV[10])
return 'done'
