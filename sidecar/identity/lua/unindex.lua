-- Remove an identity from every index.
-- KEYS[1] external-id hash, KEYS[2] order set, KEYS[3] search hash
-- ARGV[1] external-id digest, ARGV[2] _id
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
