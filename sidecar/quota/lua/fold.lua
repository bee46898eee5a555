-- Add a merged identity's limit windows, reservations and concurrency leases to its
-- survivor's, once (identity/merge.py): a merge never frees quota.
-- KEYS[1] the survivor's merge marks, KEYS[2] its reservation hash, KEYS[3] its reservation
-- expiry set, KEYS[4] its lease set, then its window buckets (as many as ARGV[3] lists).
-- ARGV[1] the mark of this move, ARGV[2] JSON: {"b": [[count, ms left], ...] (per bucket,
-- in KEYS' order), "r": [request id, entry, ...] (reservations, their buckets already named
-- as the survivor's), "x": [request id, expiry ms, ...], "l": [lease, expiry ms, ...],
-- "t": [hash ms left, expiry ms left, leases ms left]}.
-- Returns 1 when added, 0 when this move was added before.
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then return 0 end
local data = cjson.decode(ARGV[2])
local function longer(key, ms)
  ms = tonumber(ms)
  if ms > 0 and redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
for i, bucket in ipairs(data.b) do
  local key = KEYS[4 + i]
  redis.call('INCRBY', key, bucket[1])
  longer(key, bucket[2])
end
local r = data.r
for i = 1, #r, 2 do
  local mine = redis.call('HGET', KEYS[2], r[i])
  redis.call('HSET', KEYS[2], r[i], mine and (mine .. ' ' .. r[i + 1]) or r[i + 1])
end
local x = data.x
for i = 1, #x, 2 do redis.call('ZADD', KEYS[3], 'GT', x[i + 1], x[i]) end
local l = data.l
for i = 1, #l, 2 do redis.call('ZADD', KEYS[4], 'GT', l[i + 1], l[i]) end
if #r > 0 then longer(KEYS[2], data.t[1]) end
if #x > 0 then longer(KEYS[3], data.t[2]) end
if #l > 0 then longer(KEYS[4], data.t[3]) end
return 1
