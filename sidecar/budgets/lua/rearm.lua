-- After a reset: count it, and re-arm the budget's alerts (its thresholds fire again this period).
-- KEYS[1] the record, [2] the re-arm counts, [3] the generation, [4] the reset counts; ARGV[1] _id.
-- Returns 1, or 0 when the budget does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
redis.call('INCR', KEYS[3])
return 1
