-- Build the search index, or mend it, a batch per call: every order-set member without a seq
-- gets one, in creation order, and is indexed.
-- KEYS[1] order set, KEYS[2..6] the search index (ngram.lua), KEYS[7] the builder's lock
-- ARGV[1] the builder's token (the lock must hold it), ARGV[2] members indexed per call, at
-- most, ARGV[3] the lock's new lifetime (ms), ARGV[4] members looked at per call, at most,
-- ARGV[5] '1' to walk a built index too (mend: index what a version without it listed)
-- Returns {state, members indexed by this call}: 'building' while there is more to do, 'ready'
-- once done (the lock is then released), 'lost' when the lock is not this builder's.
if redis.call('GET', KEYS[7]) ~= ARGV[1] then return {'lost', 0} end
redis.call('PEXPIRE', KEYS[7], ARGV[3])
g_keys(2)
local order, meta = KEYS[1], G.meta
local state = redis.call('HGET', meta, 'state')
local bound = redis.call('HGET', meta, 'bound')
if not bound then
  if state == 'ready' and ARGV[5] ~= '1' then
    redis.call('DEL', KEYS[7])
    return {'ready', 0}
  end
  local first = tonumber(redis.call('HGET', meta, 'seq') or '0')
  if state then
    -- Members without a seq though the index exists take seqs from the counter, as late
    -- arrivals.
    redis.call('HSET', meta, 'bound', '-', 'next', first, 'end', first)
  else
    -- A first build reserves a seq for every member, in creation order, below the seqs that
    -- identities created meanwhile take; 'top' starts at the newest member's time.
    local total = redis.call('ZCARD', order)
    local newest = redis.call('ZREVRANGEBYLEX', order, '+', '-', 'LIMIT', 0, 1)
    local top = -1
    if newest[1] then top = g_ms(newest[1]) end
    redis.call('HSET', meta, 'state', 'building', 'bound', '-', 'next', first,
      'end', first + total, 'seq', first + total, 'top', string.format('%.0f', top),
      'late', 0, 'count', 0)
  end
  bound = '-'
end
local most, look = tonumber(ARGV[2]), tonumber(ARGV[4])
local batch = redis.call('ZRANGEBYLEX', order, bound, '+', 'LIMIT', 0, look)
local nxt = tonumber(redis.call('HGET', meta, 'next'))
local stop = tonumber(redis.call('HGET', meta, 'end'))
local done, seen = 0, 0
for i = 1, #batch do
  local member = batch[i]
  seen = i
  if not g_seq(member) then
    -- Reserved seqs ascend, and identities created meanwhile take seqs from `end` on: below
    -- the chunk of `end`, each reserved seq is the highest of its chunk when it is indexed.
    local seq, newest = nxt, math.floor(nxt / G_CHUNK) < math.floor(stop / G_CHUNK)
    if nxt < stop then
      nxt = nxt + 1
    else
      seq, newest = redis.call('HINCRBY', meta, 'seq', 1) - 1, true
      g_arrived(string.sub(member, 1, 26), seq)
    end
    local indexed = member .. '\2' .. seq
    g_index(indexed, seq, newest)
    redis.call('ZREM', order, member)
    redis.call('ZADD', order, 0, indexed)
    done = done + 1
    if done >= most then break end
  end
end
if seen == #batch and #batch < look then
  redis.call('HDEL', meta, 'bound', 'next', 'end')
  redis.call('HSET', meta, 'state', 'ready')
  redis.call('DEL', KEYS[7])
  return {'ready', done}
end
redis.call('HSET', meta, 'bound', '(' .. string.sub(batch[seen], 1, 26) .. '\1', 'next', nxt)
return {'building', done}
