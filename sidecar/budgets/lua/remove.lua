-- Delete a budget, its index entries and its re-arm count.
-- KEYS as save.lua's; ARGV[1] _id. Returns 1, or 0 when it did not exist.
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('INCR', KEYS[6])
return 1
