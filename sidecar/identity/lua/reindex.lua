-- Replace an identity's order-set member (its search text changed), unless it was deleted;
-- its search index entries follow.
-- KEYS[1] order set, KEYS[2..6] the search index (ngram.lua)
-- ARGV[1] _id, ARGV[2] the new member (without a seq: the old one's is kept)
local old = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[1] .. '\0', '(' .. ARGV[1] .. '\1')
if #old == 0 then return 0 end
g_keys(2)
for i = 1, #old do redis.call('ZREM', KEYS[1], old[i]) end
for i = 2, #old do g_unindex(old[i]) end
redis.call('ZADD', KEYS[1], 0, g_replace(old[1], ARGV[2]))
return 1
