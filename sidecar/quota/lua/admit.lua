-- Check every limit of one request's subjects and, only if all of them admit it, count it.
-- KEYS: per limit, its current and previous bucket (the previous one is never read for a
-- calendar window); then one lease set per concurrency limit; then, per subject that
-- reserves, its reservation hash and its reservation expiry set.
-- ARGV[1] the limits, one argument (cheaper to send than seven each): per limit 'kind amount
-- window elapsed lifetime reserve paid ' with kind REQUESTS, TOKENS or COST (the codes come
-- first, in a prelude limiter.py writes), window in ms (0 for a calendar window), ms elapsed in
-- the current bucket, bucket lifetime (s), what the request reserves of a token or cost limit
-- (0: nothing; it is then admitted while the window is under its amount), and what an allowance
-- the process holds paid of it (counted already: the limit is neither checked nor counted);
-- ARGV[2] now (ms), ARGV[3] the concurrency limits, one per lease set, as 'n n ...' ('' for
-- none), ARGV[4] lease member (the request id), ARGV[5] lease length (ms), ARGV[6] per
-- reserving subject, the indexes (1-based) of its limits that reserve, as 'i,i i,i ...' ('' for
-- none), ARGV[7] how long a reservation lasts (ms) before it is given back unsettled, ARGV[8]
-- what the calling process asks to hold ahead (an allowance, see quota/allowances.py), per
-- limit 'ask least ' ('' for none), ARGV[9] the share of what a limit has left that an
-- allowance may take (8: an eighth), ARGV[10] '1' when the process settles a request granted
-- allowances itself (its reservations are then not recorded), else '0'.
-- Returns {admitted (1/0), {leases in use per lease set}, {per limit: previous, current},
-- {per limit: allowance granted}} with the counts as they are after this call (reservations
-- and allowances included). A refused request changes nothing but giving back expired
-- reservations.
local limits = {}
for kind, amount, window, elapsed, lifetime, reserve, paid in
    string.gmatch(ARGV[1], '(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)') do
  limits[#limits + 1] = {kind, tonumber(amount), tonumber(window), tonumber(elapsed), lifetime,
    tonumber(reserve), tonumber(paid)}
end
local n = #limits
local now = tonumber(ARGV[2])
local caps = {}
for cap in string.gmatch(ARGV[3], '%S+') do caps[#caps + 1] = tonumber(cap) end
local groups = {}
for group in string.gmatch(ARGV[6], '%S+') do
  local members = {}
  for i in string.gmatch(group, '%d+') do members[#members + 1] = tonumber(i) end
  groups[#groups + 1] = members
end
local first_reservation = 2 * n + #caps + 1
-- Reservations whose request never settled (its sidecar died): given back first.
for g = 1, #groups do
  local hash, expiry = KEYS[first_reservation + 2 * g - 2], KEYS[first_reservation + 2 * g - 1]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do
    local entry = redis.call('HGET', hash, id)
    if entry then
      for bucket, amount in string.gmatch(entry, '(%S+) (%S+)') do
        if redis.call('EXISTS', bucket) == 1 then
          if redis.call('DECRBY', bucket, amount) < 0 then redis.call('SET', bucket, 0, 'KEEPTTL') end
        end
      end
      redis.call('HDEL', hash, id)
    end
    redis.call('ZREM', expiry, id)
  end
end
local counts = {}
local refused = false
local buckets = {}
if n > 0 then buckets = redis.call('MGET', unpack(KEYS, 1, 2 * n)) end
for i = 1, n do
  local kind, amount, window, elapsed = limits[i][1], limits[i][2], limits[i][3], limits[i][4]
  local reserve = limits[i][6]
  local current = tonumber(buckets[2 * i - 1] or '0')
  local previous = 0
  if window > 0 then previous = tonumber(buckets[2 * i] or '0') end
  local used = current
  if window > 0 then used = previous * (window - elapsed) / window + current end
  if limits[i][7] > 0 then
    -- paid from an allowance: counted when it was granted
  elseif kind == REQUESTS then
    if used + 1 > amount then refused = true end
  elseif reserve > 0 then
    if used + reserve > amount then refused = true end
  elseif used >= amount then
    refused = true
  end
  counts[#counts + 1] = previous
  counts[#counts + 1] = current
end
local leases = {}
for j = 1, #caps do
  local key = KEYS[2 * n + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  leases[j] = redis.call('ZCARD', key)
  if leases[j] >= caps[j] then refused = true end
end
if refused then return {0, leases, counts} end
for i = 1, n do
  local add = 0
  if limits[i][7] > 0 then add = 0
  elseif limits[i][1] == REQUESTS then add = 1 else add = limits[i][6] end
  if add > 0 then
    counts[2 * i] = redis.call('INCRBY', KEYS[2 * i - 1], add)
    -- Whoever creates a bucket gives it its lifetime (settle.lua too).
    if counts[2 * i] == add then redis.call('EXPIRE', KEYS[2 * i - 1], limits[i][5]) end
  end
end
for j = 1, #caps do
  -- Leases all last as long, so the newest expires last: the set lives as long as it does.
  local key = KEYS[2 * n + j]
  redis.call('ZADD', key, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', key, tonumber(ARGV[5]))
  leases[j] = leases[j] + 1
end
-- Allowances: counted now, used by the process without asking again. Each takes at most a
-- share of what is left after this request, and none is granted below what one request needs;
-- all of the request's limits get one or none does: near any limit's edge every request is
-- checked here.
local grants = {}
local all = false
if ARGV[8] ~= '' then
  local share = tonumber(ARGV[9])
  all = true
  local i = 0
  for ask, least in string.gmatch(ARGV[8], '(%S+) (%S+)') do
    i = i + 1
    local window, elapsed, amount = limits[i][3], limits[i][4], limits[i][2]
    local used = counts[2 * i]
    if window > 0 then used = counts[2 * i - 1] * (window - elapsed) / window + used end
    local grant = math.floor((amount - used) / share)
    if grant > tonumber(ask) then grant = tonumber(ask) end
    if grant < tonumber(least) then all = false end
    grants[i] = grant
  end
  for j = 1, i do
    if not all then grants[j] = 0 end
    if grants[j] > 0 then
      counts[2 * j] = redis.call('INCRBY', KEYS[2 * j - 1], grants[j])
      if counts[2 * j] == grants[j] then redis.call('EXPIRE', KEYS[2 * j - 1], limits[j][5]) end
    end
  end
end
-- A request granted allowances with `ARGV[10]` '1' is settled by the process against them:
-- its reservations are not recorded here (like the allowances, they stay counted should the
-- process die). Otherwise they are, for settle.lua, or for giving back when they expire.
if not (all and ARGV[10] == '1') then
  local until_ms = now + tonumber(ARGV[7])
  for g = 1, #groups do
    local hash, expiry = KEYS[first_reservation + 2 * g - 2], KEYS[first_reservation + 2 * g - 1]
    local parts = {}
    for _, i in ipairs(groups[g]) do
      parts[#parts + 1] = KEYS[2 * i - 1] .. ' ' .. limits[i][6]
    end
    redis.call('HSET', hash, ARGV[4], table.concat(parts, ' '))
    redis.call('ZADD', expiry, until_ms, ARGV[4])
    redis.call('PEXPIRE', hash, tonumber(ARGV[7]) + 60000)
    redis.call('PEXPIRE', expiry, tonumber(ARGV[7]) + 60000)
  end
end
return {1, leases, counts, grants}
