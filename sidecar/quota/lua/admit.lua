-- Check every limit of one request's subjects and, only if all of them admit it, count it.
-- KEYS: per limit, its current and previous bucket (the previous one is never read for a
-- calendar window); then one lease set per concurrency limit.
-- ARGV[1] the limits, one argument (cheaper to send than five each): per limit 'kind amount
-- window elapsed lifetime ' with kind REQUESTS, TOKENS or COST (the codes come first, in a
-- prelude limiter.py writes), window in ms (0 for a calendar window), ms elapsed in the
-- current bucket, bucket lifetime (s);
-- ARGV[2] now (ms), ARGV[3] the concurrency limits, one per lease set, as 'n n ...' ('' for
-- none), ARGV[4] lease member (the request id), ARGV[5] lease length (ms).
-- Returns {admitted (1/0), {leases in use per lease set}, {per limit: previous, current}} with
-- the counts as they are after this call. A refused request changes nothing.
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
local caps = {}
for cap in string.gmatch(ARGV[3], '%S+') do caps[#caps + 1] = tonumber(cap) end
local leases = {}
for j = 1, #caps do
  local key = KEYS[2 * n + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  leases[j] = redis.call('ZCARD', key)
  if leases[j] >= caps[j] then refused = true end
end
if refused then return {0, leases, counts} end
for i = 1, n do
  if limits[i][1] == REQUESTS then
    counts[2 * i] = redis.call('INCR', KEYS[2 * i - 1])
    -- Whoever creates a bucket gives it its lifetime (record.lua does for the charges).
    if counts[2 * i] == 1 then redis.call('EXPIRE', KEYS[2 * i - 1], limits[i][5]) end
  end
end
for j = 1, #caps do
  -- Leases all last as long, so the newest expires last: the set lives as long as it does.
  local key = KEYS[2 * n + j]
  redis.call('ZADD', key, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', key, tonumber(ARGV[5]))
  leases[j] = leases[j] + 1
end
return {1, leases, counts}
