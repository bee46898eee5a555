-- Map an external id to an identity and list it (and index it for search, once the index
-- exists), unless another identity has the external id already.
-- KEYS[1] external-id hash, KEYS[2] order set, KEYS[3..7] the search index (ngram.lua); with a
-- creation cap, KEYS[8] and KEYS[9] the creator's count of new identities in this minute and
-- the previous one.
-- ARGV[1] external-id digest, ARGV[2] candidate _id, ARGV[3] its order-set member; with a
-- cap, ARGV[4] the cap (identities per minute, sliding) and ARGV[5] ms elapsed in this minute.
-- Returns the _id that owns the external id now, or '' when the creator is over its cap (a new
-- identity is refused; nothing is written).
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
if KEYS[8] then
  local cap = tonumber(ARGV[4])
  local elapsed = tonumber(ARGV[5])
  local current = tonumber(redis.call('GET', KEYS[8]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[9]) or '0')
  if previous * (60000 - elapsed) / 60000 + current + 1 > cap then return '' end
  redis.call('INCR', KEYS[8])
  redis.call('EXPIRE', KEYS[8], 121)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
g_keys(3)
redis.call('ZADD', KEYS[2], 0, g_new(KEYS[2], ARGV[3]))
return ARGV[2]
