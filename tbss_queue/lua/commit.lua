-- commit: make one submission visible and its messages consumable, all at once.
-- A new batch adopts the staged records by RENAME (constant time: merging a 1,000,000-command
-- batch entry by entry blocked Redis for 16 s). A resubmission or retry merges its staged states
-- only where a command is still in the state the submitter read (`expect`): a command that
-- started or finished meanwhile is left alone, and its extra message is dropped by the claim.
-- KEYS: meta cmd state counts staging queue batches s_meta s_cmd s_state s_counts s_expect
--       files held
-- ARGV: batch_id now n_messages file_key releasing_a_hold file_owner ('' a new file, '*' any)
-- Returns the number of messages published; -1 a hold released by someone else already; -2
-- another submission of the same file committed first (plan again).
if ARGV[5] == '1' and redis.call('HDEL', KEYS[14], ARGV[1]) == 0 then return -1 end
if ARGV[6] ~= '*' and (redis.call('HGET', KEYS[13], ARGV[4]) or '') ~= ARGV[6] then
  return -2
end
local function merge(src, dst)
  local kv = redis.call('HGETALL', src)
  for i = 1, #kv, 2 do redis.call('HSET', dst, kv[i], kv[i + 1]) end
end
local function adopt(src, dst)
  if redis.call('EXISTS', src) == 1 then
    redis.call('RENAME', src, dst)
    redis.call('PERSIST', dst)
  end
end
merge(KEYS[8], KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
  adopt(KEYS[9], KEYS[2])
  adopt(KEYS[10], KEYS[3])
  adopt(KEYS[11], KEYS[4])
else
  merge(KEYS[9], KEYS[2])
  local st = redis.call('HGETALL', KEYS[10])
  for i = 1, #st, 2 do
    local old = redis.call('HGET', KEYS[3], st[i])
    local expect = redis.call('HGET', KEYS[12], st[i]) or ''
    if (old or '') == expect then
      if old then redis.call('HINCRBY', KEYS[4], old, -1) end
      redis.call('HSET', KEYS[3], st[i], st[i + 1])
      redis.call('HINCRBY', KEYS[4], st[i + 1], 1)
    end
  end
end
local n = tonumber(ARGV[3])
for i = 1, n do redis.call('LMOVE', KEYS[5], KEYS[6], 'RIGHT', 'LEFT') end
redis.call('DEL', KEYS[5], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12])
redis.call('HSET', KEYS[1], 'total', redis.call('HLEN', KEYS[3]), 'committed', ARGV[2])
redis.call('HSET', KEYS[13], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[7], 'NX', ARGV[2], ARGV[1])
return n
