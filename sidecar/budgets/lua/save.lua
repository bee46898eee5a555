-- Write a budget and its index entries; every change bumps the generation, by which each
-- process knows to reload the budgets in force.
-- KEYS[1] the record, [2] every budget, [3] its kind's, [4] its scope's, [5] the re-arm counts,
-- [6] the generation.
-- ARGV[1] _id, [2] the record (JSON), [3] 'create' (only if new) or 'update' (only if it
-- exists), [4] '1' to re-arm its alerts (a changed amount), else '0'.
-- Returns the new generation, or 0 when nothing was written.
local exists = redis.call('EXISTS', KEYS[1]) == 1
if (ARGV[3] == 'create') == exists then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[5], ARGV[1], 1) end
return redis.call('INCR', KEYS[6])
