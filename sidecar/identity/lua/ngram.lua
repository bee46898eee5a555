-- The search index's writes, shared by every script that writes the order set, so that an
-- identity's index entries change in the same step as its member (sidecar/identity/ngram.py
-- describes the layout). The constants before this come from ngram.py.
--
-- A member: _id (26 characters), \0, external id \0 name \0 email in lower case, \1, each tag
-- followed by \1, and once indexed \2 and the identity's seq. The text fields carry no control
-- characters.
local G = {}

-- The index's keys, from KEYS[first] on: meta hash, postings prefix, id-slots prefix,
-- directory of trigram suffixes, late set.
local function g_keys(first)
  G.meta, G.postings, G.ids = KEYS[first], KEYS[first + 1], KEYS[first + 2]
  G.suffixes, G.late = KEYS[first + 3], KEYS[first + 4]
end

-- The creation time an _id carries, in ms. (Nothing is computed before the functions: a
-- script's top level runs on every call.)
local function g_ms(id)
  local ms, find, sub = 0, string.find, string.sub
  for i = 1, 10 do ms = ms * 32 + find(G_CROCKFORD, sub(id, i, i), 1, true) - 1 end
  return ms
end

-- A member's seq, or nil when it is not indexed.
local function g_seq(member)
  local at = string.find(member, '\2', 28, true)
  if at then return tonumber(string.sub(member, at + 1)) end
  return nil
end

-- The set of a member's grams: the trigrams of each non-empty text field with G_START before
-- it, and \1 followed by each tag.
local function g_grams(member)
  local found = {}
  local stop = string.find(member, '\1', 28, true)
  for field in string.gmatch(string.sub(member, 28, stop - 1), '[^%z]+') do
    local s = G_START .. field
    for i = 1, #s - 2 do found[string.sub(s, i, i + 2)] = true end
  end
  local seq_at = string.find(member, '\2', stop, true)
  local tags = string.sub(member, stop + 1, (seq_at or #member + 1) - 1)
  for tag in string.gmatch(tags, '[^\1]+') do found['\1' .. tag] = true end
  return found
end

-- A gram's posting strings: a trigram's named by its hex, a tag's by a digest (ngram.py's
-- key_part).
local function g_key(gram, chunk)
  local a, b, c = string.byte(gram, 1, 3)
  if a == 1 then
    return G.postings .. 't' .. string.sub(redis.sha1hex(string.sub(gram, 2)), 1, 24) .. ':'
      .. chunk
  end
  return G.postings .. string.format('%02x%02x%02x:%d', a, b, c, chunk)
end

-- A new posting string: a trigram goes in the directory of suffixes (not a tag).
local function g_started(gram)
  if string.byte(gram, 1) ~= 1 then
    redis.call('ZADD', G.suffixes, 0, string.reverse(gram))
  end
end

-- Posting strings hold 2-byte big-endian offsets, sorted; compared as numbers (Lua compares
-- strings with the locale's collation).
local function g_pack(n)
  return string.char(math.floor(n / 256), n % 256)
end

local function g_at(s, i)
  local a, b = string.byte(s, 2 * i - 1, 2 * i)
  return a * 256 + b
end

-- The first (1-based) entry of `s` that is >= v, or one past the end.
local function g_search(s, v)
  local lo, hi = 1, #s / 2 + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if g_at(s, mid) < v then lo = mid + 1 else hi = mid end
  end
  return lo
end

-- Add v to a posting string (an append, unless it belongs before the last entry); true when
-- the string is new.
local function g_insert(key, v)
  local last = redis.call('GETRANGE', key, -2, -1)
  if last == '' then
    redis.call('SET', key, g_pack(v))
    return true
  end
  local at_end = g_at(last, 1)
  if at_end < v then
    redis.call('APPEND', key, g_pack(v))
  elseif at_end > v then
    local s = redis.call('GET', key)
    local i = g_search(s, v)
    if g_at(s, i) ~= v then
      redis.call('SET', key, string.sub(s, 1, 2 * i - 2) .. g_pack(v) .. string.sub(s, 2 * i - 1))
    end
  end
  return false
end

-- Take v out of a gram's posting string of `chunk`. A trigram no identity has any more leaves
-- the directory too (erasure leaves no fragment of the text behind).
local function g_remove(gram, chunk, v)
  local key = g_key(gram, chunk)
  local s = redis.call('GET', key)
  if not s then return end
  local i = g_search(s, v)
  if i > #s / 2 or g_at(s, i) ~= v then return end
  if #s > 2 then
    redis.call('SET', key, string.sub(s, 1, 2 * i - 2) .. string.sub(s, 2 * i + 1))
    return
  end
  redis.call('DEL', key)
  if string.byte(gram, 1) == 1 then return end
  local seqs = tonumber(redis.call('HGET', G.meta, 'seq') or '0')
  for other = 0, math.floor((seqs - 1) / G_CHUNK) do
    if redis.call('EXISTS', g_key(gram, other)) == 1 then return end
  end
  redis.call('ZREM', G.suffixes, string.reverse(gram))
end

local function g_post(gram, chunk, v)
  if g_insert(g_key(gram, chunk), v) then g_started(gram) end
end

-- Write a seq's id slot. A string of slots is made whole when its first slot is written: a
-- string grown a slot at a time would hold up to twice its length.
local function g_slot(seq, id)
  local key, at = G.ids .. math.floor(seq / G_ID_BLOCK), (seq % G_ID_BLOCK) * 26
  if redis.call('SETRANGE', key, at, id) < G_ID_BLOCK * 26 then
    local whole = string.rep('\0', at) .. id
    redis.call('SET', key, whole .. string.rep('\0', G_ID_BLOCK * 26 - #whole))
  end
end

-- Index a member that carries its seq: its postings and its id slot. `newest`: the seq is the
-- highest handed out, so it goes at the end of every posting string (one APPEND each).
local function g_index(member, seq, newest)
  local chunk, v = math.floor(seq / G_CHUNK), seq % G_CHUNK
  if newest then
    local packed = g_pack(v)
    for gram in pairs(g_grams(member)) do
      if redis.call('APPEND', g_key(gram, chunk), packed) == 2 then g_started(gram) end
    end
  else
    for gram in pairs(g_grams(member)) do g_post(gram, chunk, v) end
  end
  g_slot(seq, string.sub(member, 1, 26))
  redis.call('HINCRBY', G.meta, 'count', 1)
end

-- A seq taken from the counter: how far its _id is behind the newest indexed before it.
-- Within G_LATE_MS the meta's `late` (the most seen) covers it; beyond, the late set names it.
local function g_arrived(id, seq)
  local ms = g_ms(id)
  local top = tonumber(redis.call('HGET', G.meta, 'top') or '-1')
  if ms > top then
    redis.call('HSET', G.meta, 'top', string.format('%.0f', ms))
  elseif top - ms > G_LATE_MS then
    redis.call('ZADD', G.late, seq, seq)
  elseif top - ms > tonumber(redis.call('HGET', G.meta, 'late') or '0') then
    redis.call('HSET', G.meta, 'late', string.format('%.0f', top - ms))
  end
end

-- The member to store for a new identity in the order set `order`: with a seq and indexed,
-- once the index exists (the first identity of an empty list starts it: nothing to build).
local function g_new(order, member)
  if not redis.call('HGET', G.meta, 'state') then
    if redis.call('EXISTS', order) == 1 then return member end
    redis.call('HSET', G.meta, 'state', 'ready', 'late', 0, 'count', 0)
  end
  local seq = redis.call('HINCRBY', G.meta, 'seq', 1) - 1
  g_arrived(string.sub(member, 1, 26), seq)
  member = member .. '\2' .. seq
  g_index(member, seq, true)
  return member
end

-- The member to store in place of `old` (same _id, new text): the index follows the text.
local function g_replace(old, member)
  local seq = g_seq(old)
  if not seq then return member end
  member = member .. '\2' .. seq
  local before, after = g_grams(old), g_grams(member)
  local chunk, v = math.floor(seq / G_CHUNK), seq % G_CHUNK
  for gram in pairs(before) do
    if not after[gram] then g_remove(gram, chunk, v) end
  end
  for gram in pairs(after) do
    if not before[gram] then g_post(gram, chunk, v) end
  end
  return member
end

-- Take a member out of the index (erasure: its postings, its id slot).
local function g_unindex(member)
  local seq = g_seq(member)
  if not seq then return end
  local chunk, v = math.floor(seq / G_CHUNK), seq % G_CHUNK
  for gram in pairs(g_grams(member)) do g_remove(gram, chunk, v) end
  g_slot(seq, string.rep('\0', 26))
  redis.call('ZREM', G.late, seq)
  redis.call('HINCRBY', G.meta, 'count', -1)
end
