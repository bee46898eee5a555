-- Point a budget at another target of its scope kind (a merged identity's budgets follow its
-- survivor), moving it between the scope indexes; bumps the generation.
-- KEYS[1] the record, [2] the old scope's index, [3] the new scope's, [4] the generation.
-- ARGV[1] _id, [2] the record (JSON). Returns the new generation, or 0 when it was deleted.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
return redis.call('INCR', KEYS[4])
