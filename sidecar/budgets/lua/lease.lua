-- The sender's lease: one process at a time sends the outbox's deliveries.
-- KEYS[1] the lease; ARGV[1] this process's token, [2] lifetime (ms), [3] 'take' or 'drop'.
-- 'take' renews the lease this process holds, or takes it when nobody does: 1 when held.
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == 'drop' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
