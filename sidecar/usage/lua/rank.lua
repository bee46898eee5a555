-- Add to one day's top-spenders sets, many identities at once (one call per day and flush).
-- KEYS[i]: the day's sorted set of counter i (see ARGV[1]).
-- ARGV[1] the counters, in KEYS' order, as 'r e c'; ARGV[2] the sets' lifetime (s);
-- ARGV[3] the increments as 'counter _id n counter _id n ...' (one argument: cheaper to send).
local index = {}
local i = 1
for counter in string.gmatch(ARGV[1], '%S+') do
  index[counter] = KEYS[i]
  i = i + 1
end
for counter, member, n in string.gmatch(ARGV[3], '(%S+) (%S+) (%S+)') do
  redis.call('ZINCRBY', index[counter], n, member)
end
for j = 1, #KEYS do
  if redis.call('EXISTS', KEYS[j]) == 1 then redis.call('EXPIRE', KEYS[j], ARGV[2]) end
end
return 1
