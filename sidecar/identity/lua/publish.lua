-- A merge's step in the {idx} slot: make the merged identity an alias of the survivor and take
-- it out of the list, in one step (identity/merge.py). Idempotent: a retry changes nothing.
-- KEYS[1] external-id hash, KEYS[2] order set, KEYS[3..7] the search index (ngram.lua),
-- KEYS[8] the alias hash, KEYS[9] the merge's journal, KEYS[10] the survivor's aliases,
-- KEYS[11] the merged identity's aliases, KEYS[12] the unfinished merges, KEYS[13] the alias
-- generation.
-- ARGV[1] merged _id, ARGV[2] the digest of its external id, ARGV[3] its external id,
-- ARGV[4] survivor _id, ARGV[5] survivor external id, ARGV[6] the merged record's profile
-- (JSON, kept for the steps that follow), ARGV[7] now (ms).
-- Returns {'ok'} or {'conflict', the _id the journal merges into}.
local merged, survivor, survivor_x = ARGV[1], ARGV[4], ARGV[5]
local into = redis.call('HGET', KEYS[9], 'into')
if into and into ~= survivor then return {'conflict', into} end
if not into then
  redis.call('HSET', KEYS[9], 'into', survivor, 'into_x', survivor_x, 'from_x', ARGV[3],
    'profile', ARGV[6], 'at', ARGV[7])
end
-- The merged identity's own aliases (an earlier merge into it) now name the survivor.
local chain = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[11])) do
  if string.sub(member, 1, 2) == 'i:' then
    redis.call('HSET', KEYS[8], member, survivor)
  else
    local digest, name = string.sub(member, 3, 34), string.sub(member, 36)
    local old = redis.call('HGET', KEYS[8], 'x:' .. name) or ''
    redis.call('HSET', KEYS[8], 'x:' .. name, survivor .. string.sub(old, 27, 52) .. survivor_x)
    redis.call('HSET', KEYS[1], digest, survivor)
    chain[#chain + 1] = name
  end
  redis.call('SADD', KEYS[10], member)
end
redis.call('DEL', KEYS[11])
if #chain > 0 then redis.call('HSET', KEYS[9], 'chain', table.concat(chain, '\n')) end
redis.call('HSET', KEYS[8], 'x:' .. ARGV[3], survivor .. merged .. survivor_x, 'i:' .. merged,
  survivor)
redis.call('HSET', KEYS[1], ARGV[2], survivor)
redis.call('SADD', KEYS[10], 'x:' .. ARGV[2] .. ' ' .. ARGV[3], 'i:' .. merged)
g_keys(3)
local old = redis.call('ZRANGEBYLEX', KEYS[2], '[' .. merged .. '\0', '(' .. merged .. '\1')
for i = 1, #old do
  g_unindex(old[i])
  redis.call('ZREM', KEYS[2], old[i])
end
if redis.call('HGET', KEYS[9], 'done') ~= '1' then redis.call('SADD', KEYS[12], merged) end
redis.call('INCR', KEYS[13])
return {'ok'}
