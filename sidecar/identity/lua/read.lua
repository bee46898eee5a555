-- One identity's record and, optionally, its usage over the last WINDOW days.
-- KEYS[1] record hash, KEYS[2] its day-counter hash (absent: no usage).
-- ARGV[1] today (days since the epoch).
-- Returns {record as a flat list} or {record, {requests, errors, input, output, cost,
-- rate_limited}} with each sum as a decimal string.
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 or not KEYS[2] then return {record} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {record, {'0', '0', '0', '0', '0', '0'}} end
align(KEYS[2], tonumber(ARGV[1]))
local sums = redis.call('HMGET', KEYS[2], 's:r', 's:e', 's:i', 's:o', 's:c', 's:rl')
for i = 1, #sums do sums[i] = sums[i] or '0' end
return {record, sums}
