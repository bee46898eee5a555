-- Fire one alert: once per budget, threshold, period and arming, whichever process sees the
-- crossing first; its deliveries (one per notifier) go into the outbox in the same step.
-- KEYS[1] the fired marker, [2] the outbox, [3] the budget's delivery log, then one delivery
-- hash per notifier.
-- ARGV[1] the marker's lifetime (s), [2] now (ms), [3] deliveries the log keeps, [4] the alert
-- id, [5] the budget _id, [6] the threshold, [7] the identity ('' for none), then per
-- delivery: its id, the notifier's name, the body.
-- Returns 1 when fired, 0 when it had been.
if not redis.call('SET', KEYS[1], ARGV[4], 'NX', 'EX', ARGV[1]) then return 0 end
local n = #KEYS - 3
for i = 1, n do
  local at = 7 + 3 * (i - 1)
  redis.call('HSET', KEYS[3 + i],
    'alert', ARGV[4], 'budget', ARGV[5], 'threshold', ARGV[6], 'identity', ARGV[7],
    'notifier', ARGV[at + 2], 'body', ARGV[at + 3], 'status', 'pending', 'attempts', 0,
    'created', ARGV[2], 'next', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[at + 1])
  redis.call('LPUSH', KEYS[3], ARGV[at + 1])
end
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return 1
