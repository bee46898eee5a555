-- Claim the deliveries that are due, for the lease holder only: each is pushed back to
-- `hold` (ms), so that a send cut short (a crash) is retried then, and nobody else sends it
-- meanwhile.
-- KEYS[1] the lease, [2] the outbox; ARGV[1] the token, [2] now (ms), [3] how many, [4] hold.
-- Returns the claimed delivery ids, or -1 when this process does not hold the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[2], ARGV[4], id) end
return due
