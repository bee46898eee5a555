-- Remove an identity from every index: the external-id hash, the order set, the search index.
-- KEYS[1] external-id hash, KEYS[2] order set, KEYS[3..7] the search index (ngram.lua)
-- ARGV[1] external-id digest, ARGV[2] _id
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
g_keys(3)
local old = redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[2] .. '\0', '(' .. ARGV[2] .. '\1')
for i = 1, #old do
  g_unindex(old[i])
  redis.call('ZREM', KEYS[2], old[i])
end
return 1
