-- Replace the reservations a request made by what it used, for one or more subjects.
-- Per subject, in order: KEYS its reservation hash, its reservation expiry set, then per limit
-- charged its current bucket (charged the actual where nothing was reserved).
-- ARGV[1] the request id; then one argument per subject: per limit charged (in the order of its
-- bucket keys) 'actual lifetime prefix ', prefix being what every bucket of that limit's key
-- starts with, actual '=' when what it used is not known (its reservation then stands as its
-- charge, and where none is left nothing is charged); the argument starts with 'R ' when the
-- request is settled again (an earlier attempt may have run) and reserved for that subject: it
-- is then settled only if its reservation is still there, so that no attempt counts twice.
-- Each bucket a reservation reserved in gets actual - reserved (a bucket that expired meanwhile
-- is left alone; a count never goes below zero); a limit it did not reserve in (it expired, or
-- none was made) gets the actual in its current bucket. A subject's buckets share its slot: on a
-- cluster each subject is settled by a call of its own; on one server, all of a request's in one.
-- Returns how many subjects had a reservation settled (the others were charged without one).
local found = 0
local k = 1
for s = 2, #ARGV do
  local hash, expiry = KEYS[k], KEYS[k + 1]
  local spec = ARGV[s]
  local again = string.sub(spec, 1, 2) == 'R '
  if again then spec = string.sub(spec, 3) end
  local limits = {}
  for amount, lifetime, prefix in string.gmatch(spec, '(%S+) (%S+) (%S+)') do
    limits[#limits + 1] = {tonumber(amount), lifetime, prefix}  -- '=': nil, as reserved
  end
  local settled = {}
  local entry = redis.call('HGET', hash, ARGV[1])
  if again and not entry then
    -- settled by the earlier attempt: nothing more
    for j = 1, #limits do settled[j] = true end
  end
  if entry then
    found = found + 1
    redis.call('HDEL', hash, ARGV[1])
    redis.call('ZREM', expiry, ARGV[1])
    for bucket, reserved in string.gmatch(entry, '(%S+) (%S+)') do
      for j = 1, #limits do
        local prefix = limits[j][3]
        if not settled[j] and string.sub(bucket, 1, #prefix) == prefix then
          settled[j] = true
          local delta = 0
          if limits[j][1] then delta = limits[j][1] - tonumber(reserved) end
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
    if not settled[j] and amount and amount > 0 then
      if redis.call('INCRBY', KEYS[k + 1 + j], amount) == amount then
        redis.call('EXPIRE', KEYS[k + 1 + j], limits[j][2])
      end
    end
  end
  k = k + 2 + #limits
end
return found
