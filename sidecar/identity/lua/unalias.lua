-- Erase a survivor's aliases (its erasure): out of the alias hash and the external-id hash.
-- KEYS[1] external-id hash, KEYS[2] the alias hash, KEYS[3] the survivor's aliases,
-- KEYS[4] the alias generation. ARGV[1] the survivor's _id.
-- Returns how many aliases were erased.
local members = redis.call('SMEMBERS', KEYS[3])
for _, member in ipairs(members) do
  if string.sub(member, 1, 2) == 'i:' then
    redis.call('HDEL', KEYS[2], member)
  else
    local digest, name = string.sub(member, 3, 34), string.sub(member, 36)
    redis.call('HDEL', KEYS[2], 'x:' .. name)
    if redis.call('HGET', KEYS[1], digest) == ARGV[1] then redis.call('HDEL', KEYS[1], digest) end
  end
end
redis.call('DEL', KEYS[3])
if #members > 0 then redis.call('INCR', KEYS[4]) end
return #members
