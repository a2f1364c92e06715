-- commit: make one submission visible, in constant time: the switch after which it is certain
-- to be applied whole. A new batch adopts its staged records by RENAME; a resubmission or retry
-- registers its staged changes as pending, and `apply` merges them a chunk per call (so that no
-- script blocks Redis for long at any batch size). Messages stay staged until `apply` moves
-- them, a chunk per call, after every record they refer to.
-- KEYS: meta cmd state counts batches s_meta s_cmd s_state s_counts files held active pending
--       [keys to keep: the batch's other parts and the staged chunks, no expiry from now on]
-- ARGV: batch_id now file_key releasing_a_hold file_owner ('' a new file, '*' any) mode
--       ('new' or 'merge') pending_json
-- Returns 1; -1 a hold released by someone else already; -2 the batch is not what was planned
-- against (another submission of the same file committed first: plan again); -3 an earlier
-- submission of this batch is still being applied (apply it, then plan again).
if ARGV[4] == '1' and redis.call('HEXISTS', KEYS[11], ARGV[1]) == 0 then return -1 end
if ARGV[5] ~= '*' and (redis.call('HGET', KEYS[10], ARGV[3]) or '') ~= ARGV[5] then
  return -2
end
if redis.call('HEXISTS', KEYS[13], ARGV[1]) == 1 then return -3 end
local new = redis.call('EXISTS', KEYS[3]) == 0
if ARGV[6] == 'new' and not new then return -2 end
-- a held submission stops being held only by the commit that makes it visible: one refused
-- above stays held, to be released again
if ARGV[4] == '1' then redis.call('HDEL', KEYS[11], ARGV[1]) end
local kv = redis.call('HGETALL', KEYS[6])
for i = 1, #kv, 2 do redis.call('HSET', KEYS[1], kv[i], kv[i + 1]) end
if ARGV[6] == 'new' then
  for i = 7, 9 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i - 5]) end
  end
  redis.call('HSET', KEYS[1], 'total', redis.call('HLEN', KEYS[3]))
end
for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
for i = 14, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('UNLINK', KEYS[6], KEYS[7], KEYS[8], KEYS[9])
redis.call('HDEL', KEYS[1], 'ended_at')
redis.call('HSET', KEYS[1], 'committed', ARGV[2])
redis.call('HSET', KEYS[10], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], 'NX', ARGV[2], ARGV[1])
redis.call('SADD', KEYS[12], ARGV[1])
redis.call('HSET', KEYS[13], ARGV[1], ARGV[7])
return 1
