-- Refresh an identity's search text, unless it was deleted meanwhile.
-- KEYS[1] order set, KEYS[2] search hash; ARGV[1] _id, ARGV[2] search text
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
