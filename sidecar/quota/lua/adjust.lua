-- Add to some buckets what an allowance gives back or a request settles beyond it.
-- KEYS the buckets; ARGV[1] per bucket 'amount lifetime ' (lifetime in s).
-- A negative amount lowers a bucket that still exists, never below zero (a bucket that expired
-- or was reset is left alone); a positive one creates the bucket, with its lifetime, if need be.
-- With ARGV[2] (seconds), the last key marks this charge as made (SET NX, for that long): a
-- charge sent again, not knowing whether Redis ran the first, then changes nothing (returns -1).
if ARGV[2] and not redis.call('SET', KEYS[#KEYS], 1, 'NX', 'EX', ARGV[2]) then return -1 end
local i = 0
for amount, lifetime in string.gmatch(ARGV[1], '(%S+) (%S+)') do
  i = i + 1
  local add = tonumber(amount)
  if add < 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('INCRBY', KEYS[i], add) < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  elseif add > 0 then
    if redis.call('INCRBY', KEYS[i], add) == add then redis.call('EXPIRE', KEYS[i], lifetime) end
  end
end
return i
