-- Remove an identity from every index.
-- KEYS[1] external-id hash, KEYS[2] order set; ARGV[1] external-id digest, ARGV[2] _id
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYLEX', KEYS[2], '[' .. ARGV[2] .. '\0', '(' .. ARGV[2] .. '\1')
return 1
