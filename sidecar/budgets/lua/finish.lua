-- Record one attempt of a delivery: delivered, to retry at a time, or given up.
-- KEYS[1] the delivery, [2] the outbox; ARGV[1] its id, [2] 'delivered', 'retry' or 'failed',
-- [3] now (ms), [4] when to retry (ms), [5] the error ('' for none), [6] the HTTP status ('' for
-- none), [7] how long a finished delivery is kept (s).
-- Returns 1, or 0 when it was gone or delivered already (a late duplicate changes nothing).
local state = redis.call('HGET', KEYS[1], 'status')
if not state or state == 'delivered' then
  if not state then redis.call('ZREM', KEYS[2], ARGV[1]) end
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[2] == 'retry' and 'pending' or ARGV[2],
  'tried', ARGV[3], 'error', ARGV[5], 'http', ARGV[6])
if ARGV[2] == 'retry' then
  redis.call('HSET', KEYS[1], 'next', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  return 1
end
if ARGV[2] == 'delivered' then redis.call('HSET', KEYS[1], 'delivered', ARGV[3]) end
redis.call('HDEL', KEYS[1], 'next')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
