-- One identity's usage by model over a range of UTC days, summed.
-- KEYS[1] the identity's day-counter hash (names its slot); ARGV[1] by-model key prefix,
-- ARGV[2] first day, ARGV[3] last day (days since the epoch, both included). The day hashes'
-- keys are built here: they share the identity's hash tag.
-- Returns {model, sum, sum, ..., model, sum, ...}: per model seen, its MODEL_ORDER sums as
-- decimal strings. Exact: each value is added as two parts, the digits above the last nine
-- and the last nine, so no sum gets near the 2^53 a Lua number holds exactly.
local index = {}
for i, counter in ipairs(MODEL_ORDER) do index[counter] = i end
local width = #MODEL_ORDER
local high, low, order = {}, {}, {}
local sub, byte = string.sub, string.byte
local name_byte = byte(MODEL_NAME)
for d = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local flat = redis.call('HGETALL', ARGV[1] .. d)
  local names = {}  -- this day's slots -> models
  for n = 1, #flat, 2 do
    if byte(flat[n]) == name_byte then names[flat[n + 1]] = sub(flat[n], 2) end
  end
  for n = 1, #flat, 2 do
    local field, value = flat[n], flat[n + 1]
    local model = names[sub(field, 1, 1)]
    local i = model and index[sub(field, 2)]
    if i then
      local h, l = high[model], low[model]
      if h == nil then
        h, l = {}, {}
        for k = 1, width do h[k], l[k] = 0, 0 end
        high[model], low[model] = h, l
        order[#order + 1] = model
      end
      if #value > 9 then
        h[i] = h[i] + tonumber(sub(value, 1, -10))
        l[i] = l[i] + tonumber(sub(value, -9))
      else
        l[i] = l[i] + tonumber(value)
      end
    end
  end
end
local out = {}
for _, model in ipairs(order) do
  out[#out + 1] = model
  local h, l = high[model], low[model]
  for k = 1, width do
    local carry = math.floor(l[k] / 1e9)
    local top, rest = h[k] + carry, l[k] - carry * 1e9
    if top > 0 then
      out[#out + 1] = string.format('%.0f%09.0f', top, rest)
    else
      out[#out + 1] = string.format('%.0f', rest)
    end
  end
end
return out
