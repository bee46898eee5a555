-- Erase an identity's usage: its day counters, hour buckets and by-model day hashes.
-- KEYS[1] day-counter hash; ARGV[1] hour-bucket key prefix, ARGV[2] first hour, ARGV[3] last
-- hour, ARGV[4] by-model key prefix, ARGV[5] first day, ARGV[6] last day. Bucket keys are
-- built here: they share the identity's hash tag, so they live in its slot.
redis.call('DEL', KEYS[1])
for h = tonumber(ARGV[2]), tonumber(ARGV[3]) do redis.call('DEL', ARGV[1] .. h) end
for d = tonumber(ARGV[5]), tonumber(ARGV[6]) do redis.call('DEL', ARGV[4] .. d) end
return 1
