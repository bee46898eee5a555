-- Replace one subject's reservation for a request by what the request used.
-- KEYS[1] the subject's reservation hash, KEYS[2] its reservation expiry set, then per limit
-- charged its current bucket (charged the actual where nothing was reserved).
-- ARGV[1] the request id, ARGV[2] per limit charged (in the order of KEYS[3...]) 'actual
-- lifetime prefix ', prefix being what every bucket of that limit's key starts with.
-- Each bucket the reservation reserved in gets actual - reserved (a bucket that expired meanwhile
-- is left alone; a count never goes below zero); a limit it did not reserve in (it expired, or
-- none was made) gets the actual in its current bucket. All buckets share the subject's slot.
-- Returns 1 when a reservation was settled, 0 when the actual was charged without one.
local limits = {}
for amount, lifetime, prefix in string.gmatch(ARGV[2], '(%S+) (%S+) (%S+)') do
  limits[#limits + 1] = {tonumber(amount), lifetime, prefix}
end
local settled = {}
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  for bucket, reserved in string.gmatch(entry, '(%S+) (%S+)') do
    for j = 1, #limits do
      local prefix = limits[j][3]
      if not settled[j] and string.sub(bucket, 1, #prefix) == prefix then
        settled[j] = true
        local delta = limits[j][1] - tonumber(reserved)
        if delta ~= 0 and redis.call('EXISTS', bucket) == 1 then
          if redis.call('INCRBY', bucket, delta) < 0 then
            redis.call('SET', bucket, 0, 'KEEPTTL')
          end
        end
      end
    end
  end
end
for j = 1, #limits do
  local amount = limits[j][1]
  if not settled[j] and amount > 0 then
    if redis.call('INCRBY', KEYS[2 + j], amount) == amount then
      redis.call('EXPIRE', KEYS[2 + j], limits[j][2])
    end
  end
end
if entry then return 1 end
return 0
