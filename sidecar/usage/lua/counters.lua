-- Shared by every script that reads or writes an identity's day counters.
-- The day-counter hash holds '<day>:<counter>' per UTC day (days since the epoch) and the
-- sums of the last WINDOW days as 's:<counter>', valid for the day in 's:day'. Sums are kept
-- with HINCRBY, so they are exact 64-bit integers, never Lua doubles.
-- COUNTERS, KEPT (COUNTERS and a key owner's VIA counters), VIA, WINDOW and RETENTION come
-- before this, generated from usage/buckets.py.

local function day_fields(day, counters)
  local names = {}
  for i = 1, #counters do names[i] = day .. ':' .. counters[i] end
  return names
end

-- Move the window sums forward to `today`: take out the days that left the window and
-- delete the days past retention. Every write aligns first, so nothing older than the
-- previous alignment's retention edge is left to delete.
-- `last`: the hash's 's:day' (a number, or nil when it has none), when the caller read it
-- already; align reads it itself otherwise.
local function align_from(key, today, last)
  if last ~= nil and last >= today then return last end
  if last ~= nil then
    for day = last - WINDOW + 1, math.min(today - WINDOW, last) do
      local values = redis.call('HMGET', key, unpack(day_fields(day, COUNTERS)))
      for i = 1, #COUNTERS do
        if values[i] then redis.call('HINCRBY', key, 's:' .. COUNTERS[i], '-' .. values[i]) end
      end
    end
    for day = last - RETENTION + 1, math.min(today - RETENTION, last) do
      redis.call('HDEL', key, unpack(day_fields(day, KEPT)))
    end
  end
  redis.call('HSET', key, 's:day', today)
  return today
end

local function align(key, today)
  return align_from(key, today, tonumber(redis.call('HGET', key, 's:day')))
end
