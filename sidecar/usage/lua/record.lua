-- Count one request for one identity.
-- KEYS[1] record hash, KEYS[2] day-counter hash, KEYS[3] hour bucket, KEYS[4] the day's
-- by-model hash, KEYS[5] (optional) idempotency key for the request id, then the rate-limit
-- buckets to charge (see ARGV[8]).
-- ARGV[1] day, ARGV[2] hour, ARGV[3] seconds the hour bucket has left (<= 0: past retention),
-- ARGV[4] idempotency key lifetime (seconds), ARGV[5] source, ARGV[6] now (epoch ms),
-- ARGV[7] the increments as 'counter n counter n ...' (one argument: cheaper to send),
-- ARGV[8] the charges of the last keys as 'amount lifetime amount lifetime ...' ('' if none),
-- ARGV[9] the writing process's id (a ULID; '' for none) and ARGV[10] this write's sequence
-- number there, ARGV[11] the first 10 characters of the oldest writer id whose mark is kept,
-- ARGV[12] the model ('' for none: nothing counted by model), an argument of its own so that
-- no name can break the parsing of ARGV[7], ARGV[13] seconds the by-model hash has left.
-- Returns 1 when counted, 0 when the identity no longer exists (erased: nothing may
-- recreate its usage), 2 when this request id, or this writer's sequence number, was counted
-- before (each writer's entries for one identity arrive in sequence order: see recorder.py).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local mark = nil
if ARGV[9] ~= '' then
  mark = 'w:' .. ARGV[9]
  local seen = tonumber(redis.call('HGET', KEYS[2], mark))
  if seen and seen >= tonumber(ARGV[10]) then return 2 end
end
local charges = {}
for amount, lifetime in string.gmatch(ARGV[8], '(%S+) (%S+)') do
  charges[#charges + 1] = {amount, lifetime}
end
local first_charge = #KEYS - #charges + 1
if first_charge == 6 and not redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[4]) then return 2 end
for i = 1, #charges do
  local key = KEYS[first_charge + i - 1]
  redis.call('INCRBY', key, charges[i][1])
  redis.call('EXPIRE', key, charges[i][2])
end
local day = tonumber(ARGV[1])
local before = tonumber(redis.call('HGET', KEYS[2], 's:day'))
local current = align_from(KEYS[2], day, before)
if before and current > before then
  -- Once a day: forget the marks of writers gone for longer than a spool is replayed.
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(field, 1, 2) == 'w:' and string.sub(field, 3, 12) < ARGV[11] then
      redis.call('HDEL', KEYS[2], field)
    end
  end
end
if mark then redis.call('HSET', KEYS[2], mark, ARGV[10]) end
local in_window = day > current - WINDOW
local kept = day > current - RETENTION
local hour_ttl = tonumber(ARGV[3])
-- ARGV[1] as it came, not `day`: making a string of a number costs Redis more than the
-- HINCRBY it names (about 5% of this script, counted with callgrind).
local day_prefix = ARGV[1] .. ':'
for counter, n in string.gmatch(ARGV[7], '(%S+) (%S+)') do
  if kept then redis.call('HINCRBY', KEYS[2], day_prefix .. counter, n) end
  -- A key owner's VIA counters are kept per day only; requests by source per day and in the
  -- window sums (the hourly series reads the USAGE counters only).
  local first = string.sub(counter, 1, 1)
  if first ~= VIA then
    if in_window then redis.call('HINCRBY', KEYS[2], 's:' .. counter, n) end
    if hour_ttl > 0 and first ~= BY_SOURCE_FIRST then
      redis.call('HINCRBY', KEYS[3], counter, n)
    end
  end
end
if hour_ttl > 0 then redis.call('EXPIRE', KEYS[3], hour_ttl) end
local model, model_ttl = ARGV[12], tonumber(ARGV[13])
if model ~= '' and kept and model_ttl > 0 then
  -- A model not seen today takes the next of the day's MAX_MODELS slots, or OTHER_MODEL's.
  local models = KEYS[4]
  local slot = model_slot(models, model)
  for counter, n in string.gmatch(ARGV[7], '(%S+) (%S+)') do
    if MODEL_COUNTERS[counter] then redis.call('HINCRBY', models, slot .. counter, n) end
  end
  redis.call('EXPIRE', models, model_ttl)
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 's:src', ARGV[5], 's:at', ARGV[6]) end
return 1
