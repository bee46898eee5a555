-- Check every limit of one request and, only if all of them admit it, count it.
-- KEYS: per limit, its current and previous bucket (the previous one is never read for a
-- calendar window); then, when a concurrency limit applies, the identity's lease set.
-- ARGV[1] the limits, one argument (cheaper to send than five each): per limit 'kind amount
-- window elapsed lifetime ' with kind REQUESTS, TOKENS or COST (the codes come first, in a
-- prelude limiter.py writes), window in ms (0 for a calendar window), ms elapsed in the
-- current bucket, bucket lifetime (s);
-- ARGV[2] now (ms), ARGV[3] concurrency limit (0: none), ARGV[4] lease member (the request
-- id), ARGV[5] lease length (ms).
-- Returns {admitted (1/0), leases in use, then per limit: previous, current} with the counts
-- as they are after this call. A refused request changes nothing.
local limits = {}
for kind, amount, window, elapsed, lifetime in
    string.gmatch(ARGV[1], '(%S+) (%S+) (%S+) (%S+) (%S+)') do
  limits[#limits + 1] = {kind, tonumber(amount), tonumber(window), tonumber(elapsed), lifetime}
end
local n = #limits
local now = tonumber(ARGV[2])
local counts = {}
local refused = false
local buckets = {}
if n > 0 then buckets = redis.call('MGET', unpack(KEYS, 1, 2 * n)) end
for i = 1, n do
  local kind, amount, window, elapsed = limits[i][1], limits[i][2], limits[i][3], limits[i][4]
  local current = tonumber(buckets[2 * i - 1] or '0')
  local previous = 0
  if window > 0 then previous = tonumber(buckets[2 * i] or '0') end
  local used = current
  if window > 0 then used = previous * (window - elapsed) / window + current end
  if kind == REQUESTS then
    if used + 1 > amount then refused = true end
  elseif used >= amount then
    refused = true
  end
  counts[#counts + 1] = previous
  counts[#counts + 1] = current
end
local concurrency = tonumber(ARGV[3])
local leases = 0
local lease_key = KEYS[2 * n + 1]
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', lease_key, '-inf', now)
  leases = redis.call('ZCARD', lease_key)
  if leases >= concurrency then refused = true end
end
if refused then
  local out = {0, leases}
  for i = 1, #counts do out[#out + 1] = counts[i] end
  return out
end
for i = 1, n do
  if limits[i][1] == REQUESTS then
    counts[2 * i] = redis.call('INCR', KEYS[2 * i - 1])
    -- Whoever creates a bucket gives it its lifetime (record.lua does for the charges).
    if counts[2 * i] == 1 then redis.call('EXPIRE', KEYS[2 * i - 1], limits[i][5]) end
  end
end
if concurrency > 0 then
  -- Leases all last as long, so the newest expires last: the set lives as long as it does.
  redis.call('ZADD', lease_key, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', lease_key, tonumber(ARGV[5]))
  leases = leases + 1
end
local out = {1, leases}
for i = 1, #counts do out[#out + 1] = counts[i] end
return out
