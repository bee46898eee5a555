-- Sum usage counters over some bucket hashes of one identity.
-- KEYS: the bucket hashes. Returns the sums in the order of ARGV (field names); the cost field
-- 'c' is returned as two numbers, billions and remainder, so that sums above 2^53 nano-dollars
-- stay exact in Lua's doubles.
local sums = {}
for i = 1, #ARGV do sums[i] = 0 end
local hi, lo = 0, 0
for k = 1, #KEYS do
  local values = redis.call('HMGET', KEYS[k], unpack(ARGV))
  for i = 1, #ARGV do
    local v = values[i]
    if v then
      if ARGV[i] == 'c' then
        local n = #v
        if n > 9 then
          hi = hi + tonumber(string.sub(v, 1, n - 9))
          lo = lo + tonumber(string.sub(v, n - 8))
        else
          lo = lo + tonumber(v)
        end
      else
        sums[i] = sums[i] + tonumber(v)
      end
    end
  end
end
local out = {}
for i = 1, #ARGV do
  if ARGV[i] == 'c' then
    local billions = hi + math.floor(lo / 1000000000)
    if billions > 0 then
      out[i] = string.format('%d%09d', billions, lo % 1000000000)
    else
      out[i] = string.format('%d', lo)
    end
  else
    out[i] = string.format('%d', sums[i])
  end
end
return out
