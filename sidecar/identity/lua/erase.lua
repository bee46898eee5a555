-- Erase an identity's record and usage.
-- KEYS[1] record hash, KEYS[2] day-counter hash; ARGV[1] hour-bucket key prefix,
-- ARGV[2] first hour, ARGV[3] last hour. Hour bucket keys are built here: they share the
-- record's hash tag, so they live in its slot.
redis.call('DEL', KEYS[1], KEYS[2])
for h = tonumber(ARGV[2]), tonumber(ARGV[3]) do redis.call('DEL', ARGV[1] .. h) end
return 1
