-- Erase an identity's usage: its day counters and hour buckets.
-- KEYS[1] day-counter hash; ARGV[1] hour-bucket key prefix, ARGV[2] first hour, ARGV[3] last
-- hour. Hour bucket keys are built here: they share the identity's hash tag, so they live in
-- its slot.
redis.call('DEL', KEYS[1])
for h = tonumber(ARGV[2]), tonumber(ARGV[3]) do redis.call('DEL', ARGV[1] .. h) end
return 1
