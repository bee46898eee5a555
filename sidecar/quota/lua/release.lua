-- Give back what an admission took, when a later step refused the request (on a Redis
-- Cluster, each slot's subjects are admitted in turn).
-- KEYS: the request buckets the admission counted in, then the lease sets it joined.
-- ARGV[1] how many of the keys are request buckets, ARGV[2] the lease member.
local buckets = tonumber(ARGV[1])
for i = 1, buckets do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
for i = buckets + 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
