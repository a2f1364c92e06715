-- end: a worker's tidy pass ends a batch no script ended (one ended by an older version, or
-- whose last outcome came while its submission was still pending): see ending.lua.
-- KEYS: active pending meta counts [the batch's other keys]
-- ARGV: batch_id default_ttl_seconds
-- Returns 1 if the batch ended now, 0 if it is still active (or was not).
return end_if_idle(1, ARGV[1], ARGV[2])
