-- Add a merged identity's usage to its survivor's, once (identity/merge.py): day counters
-- (with the 30-day sums kept right), hour buckets and by-model day hashes.
-- KEYS[1] the survivor's merge marks, KEYS[2] its day-counter hash, then its hour buckets
-- and its by-model day hashes, in the order of ARGV[3]'s entries.
-- ARGV[1] the mark of this move, ARGV[2] today (days since the epoch), ARGV[3] JSON:
-- {"d": [field, value, ...] (the merged day-counter hash), "h": [[seconds left, [field, value,
-- ...]], ...] (an hour bucket each), "m": [[seconds left, [field, value, ...]], ...] (a
-- by-model day each)}; values are decimal strings.
-- Returns 1 when added, 0 when this move was added before.
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then return 0 end
local data = cjson.decode(ARGV[3])
local summed = {}
for i = 1, #COUNTERS do summed[COUNTERS[i]] = true end
local current = align(KEYS[2], tonumber(ARGV[2]))
local days, src, at = data.d, nil, nil
for i = 1, #days, 2 do
  local field, value = days[i], days[i + 1]
  local day, counter = string.match(field, '^(%d+):(.+)$')
  if day then
    day = tonumber(day)
    if day > current - RETENTION and day <= current then
      redis.call('HINCRBY', KEYS[2], field, value)
      if day > current - WINDOW and summed[counter] then
        redis.call('HINCRBY', KEYS[2], 's:' .. counter, value)
      end
    end
  elseif field == 's:src' then
    src = value
  elseif field == 's:at' then
    at = value
  end
end
if src and at and tonumber(at) > tonumber(redis.call('HGET', KEYS[2], 's:at') or '0') then
  redis.call('HSET', KEYS[2], 's:src', src, 's:at', at)
end
local k = 3
for _, hour in ipairs(data.h) do
  local fields = hour[2]
  for i = 1, #fields, 2 do redis.call('HINCRBY', KEYS[k], fields[i], fields[i + 1]) end
  if #fields > 0 then redis.call('EXPIRE', KEYS[k], hour[1]) end
  k = k + 1
end
for _, day in ipairs(data.m) do
  local fields, names, counts = day[2], {}, {}
  for i = 1, #fields, 2 do
    local field = fields[i]
    if string.sub(field, 1, 1) == MODEL_NAME then
      names[fields[i + 1]] = string.sub(field, 2)
    elseif field ~= MODEL_COUNT then
      counts[#counts + 1] = {string.sub(field, 1, 1), string.sub(field, 2), fields[i + 1]}
    end
  end
  local models, slots = KEYS[k], {}
  for theirs, model in pairs(names) do
    slots[theirs] = model_slot(models, model)
  end
  for _, count in ipairs(counts) do
    local slot = slots[count[1]]
    if slot and MODEL_COUNTERS[count[2]] then
      redis.call('HINCRBY', models, slot .. count[2], count[3])
    end
  end
  if #fields > 0 then redis.call('EXPIRE', models, day[1]) end
  k = k + 1
end
return 1
