-- drop_entries: drop hash entries that still hold the value the caller saw (pointing to a
-- batch that expired or was forgotten); an entry re-pointed meanwhile by a submission stays.
-- KEYS: a hash (the command index, the files)
-- ARGV: field value [field value ...]
-- Returns the number of entries dropped.
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
