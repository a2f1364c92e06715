-- ending: put in front of each script that can record a batch's last outcome (finish, release,
-- node_fault, cancel, end), so that the batch ends in that same step, not at a later tidy pass
-- of a worker that may never come. A batch with nothing queued or running and nothing pending to
-- apply has ended: it leaves the active set and every key of it expires after its retention
-- time (the `keep` its submitter set, else `default_ttl`). A later resubmission or retry makes
-- it active again and its keys permanent (commit).
-- end_if_idle(k, batch_id, default_ttl): KEYS[k..]: active pending meta counts [the batch's
-- other keys, to the end of KEYS]. Returns 1 if the batch ended now, else 0.
local function end_if_idle(k, batch_id, default_ttl)
  if redis.call('SISMEMBER', KEYS[k], batch_id) == 0 then return 0 end
  if redis.call('HEXISTS', KEYS[k + 1], batch_id) == 1 then return 0 end
  local c = redis.call('HMGET', KEYS[k + 3], 'queued', 'running')
  if tonumber(c[1] or '0') > 0 or tonumber(c[2] or '0') > 0 then return 0 end
  redis.call('SREM', KEYS[k], batch_id)
  local t = redis.call('TIME')
  redis.call('HSETNX', KEYS[k + 2], 'ended_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
  local ttl = math.max(1, math.floor(tonumber(redis.call('HGET', KEYS[k + 2], 'keep') or '') or
    tonumber(default_ttl)))
  for i = k + 2, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
  return 1
end

-- gone(meta_key): the batch was forgotten (or has expired): a late runner must not write its
-- keys again, which would then never expire.
local function gone(meta_key)
  return redis.call('EXISTS', meta_key) == 0
end
