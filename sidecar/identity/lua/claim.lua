-- Map an external id to an identity and list it (and index it for search, once the index
-- exists), unless another identity has the external id already.
-- KEYS[1] external-id hash, KEYS[2] order set, KEYS[3..7] the search index (ngram.lua)
-- ARGV[1] external-id digest, ARGV[2] candidate _id, ARGV[3] its order-set member
-- Returns the _id that owns the external id now.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
g_keys(3)
redis.call('ZADD', KEYS[2], 0, g_new(KEYS[2], ARGV[3]))
return ARGV[2]
