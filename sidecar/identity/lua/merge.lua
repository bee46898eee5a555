-- Create-or-update one identity record in one step.
-- KEYS[1] record hash, KEYS[2] (optional) the external ids merged into it: an update that
-- names one of them updates this record.
-- ARGV[1] now (epoch ms), ARGV[2] '1' to create when missing, ARGV[3] external id,
-- ARGV[4..] field/value pairs; an empty value deletes the field.
-- Returns {status, old tags JSON or false, record as a flat list}; status is
-- created | updated | same | missing | conflict.
local key = KEYS[1]
local xid = redis.call('HGET', key, 'x')
if not xid then
  if ARGV[2] ~= '1' then return {'missing', false, {}} end
  local fields = {'x', ARGV[3], 'u', ARGV[1]}
  for i = 4, #ARGV, 2 do
    if ARGV[i + 1] ~= '' then
      fields[#fields + 1] = ARGV[i]
      fields[#fields + 1] = ARGV[i + 1]
    end
  end
  redis.call('HSET', key, unpack(fields))
  return {'created', false, redis.call('HGETALL', key)}
end
if ARGV[3] ~= '' and xid ~= ARGV[3] then
  if not KEYS[2] or redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then
    return {'conflict', false, {}}
  end
end
local old_tags = redis.call('HGET', key, 't') or false
local changed = false
for i = 4, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  local current = redis.call('HGET', key, field)
  if value == '' then
    if current then
      redis.call('HDEL', key, field)
      changed = true
    end
  elseif current ~= value then
    redis.call('HSET', key, field, value)
    changed = true
  end
end
if changed then
  redis.call('HSET', key, 'u', ARGV[1])
  return {'updated', old_tags, redis.call('HGETALL', key)}
end
return {'same', old_tags, redis.call('HGETALL', key)}
