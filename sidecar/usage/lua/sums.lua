-- The sums of one identity's counters over the last WINDOW days, moved forward to today.
-- KEYS[1] the day-counter hash; ARGV[1] today (days since the epoch).
-- Returns every counter's sum, in COUNTERS order, as decimal strings ('0' when none).
local sums = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  align(KEYS[1], tonumber(ARGV[1]))
  local fields = {}
  for i = 1, #COUNTERS do fields[i] = 's:' .. COUNTERS[i] end
  sums = redis.call('HMGET', KEYS[1], unpack(fields))
end
for i = 1, #COUNTERS do sums[i] = sums[i] or '0' end
return sums
