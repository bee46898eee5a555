-- Map an external id to an identity and index it, unless another identity has it already.
-- KEYS[1] external-id hash, KEYS[2] order set; with a creation cap, KEYS[3] and KEYS[4] the
-- creator's count of new identities in this minute and the previous one.
-- ARGV[1] external-id digest, ARGV[2] candidate _id, ARGV[3] its order-set member; with a
-- cap, ARGV[4] the cap (identities per minute, sliding) and ARGV[5] ms elapsed in this minute.
-- Returns the _id that owns the external id now, or '' when the creator is over its cap (a new
-- identity is refused; nothing is written).
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner then return owner end
if KEYS[3] then
  local cap = tonumber(ARGV[4])
  local elapsed = tonumber(ARGV[5])
  local current = tonumber(redis.call('GET', KEYS[3]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[4]) or '0')
  if previous * (60000 - elapsed) / 60000 + current + 1 > cap then return '' end
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 121)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return ARGV[2]
