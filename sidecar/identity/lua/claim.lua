-- Map an external id to an identity and index it, unless another identity has it already.
-- KEYS[1] external-id hash, KEYS[2] order set
-- ARGV[1] external-id digest, ARGV[2] candidate _id, ARGV[3] its order-set member
-- Returns the _id that owns the external id now.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return ARGV[2]
