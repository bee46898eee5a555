-- Replace an identity's order-set member (its search text changed), unless it was deleted.
-- KEYS[1] order set; ARGV[1] _id, ARGV[2] the new member
local old = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[1] .. '\0', '(' .. ARGV[1] .. '\1')
if #old == 0 then return 0 end
for i = 1, #old do redis.call('ZREM', KEYS[1], old[i]) end
redis.call('ZADD', KEYS[1], 0, ARGV[2])
return 1
