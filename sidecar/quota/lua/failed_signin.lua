-- One failed sign-in from a client address, counted in the address's current window.
-- KEYS[1] the address's hash: s (the window's start, ms), n (failures in it).
-- ARGV[1] now (ms), ARGV[2] the window's length (ms).
-- A window starts at the first failure after the previous window ended; a clock behind the
-- one that started it (another host's) stays in it rather than starting a new one.
-- Returns {start, failures} as they are after this call.
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 's', 'n')
local start, count = tonumber(held[1]), tonumber(held[2])
if start == nil or count == nil or now >= start + window then
  start, count = now, 0
end
count = count + 1
redis.call('HSET', KEYS[1], 's', start, 'n', count)
redis.call('PEXPIRE', KEYS[1], math.max(start + window - now, 0) + 1000)
return {start, count}
