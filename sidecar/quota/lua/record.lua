-- Record reservations a hook-mode request took from allowances (quota/allowances.py): they are
-- counted already; settle.lua (on any sidecar) replaces them by the actual, admit.lua gives them
-- back when they expire, as any reservation.
-- Per subject, KEYS its reservation hash and its reservation expiry set; ARGV[1] the request id,
-- ARGV[2] when the reservations expire (ms), ARGV[3] how long the two keys live (ms), then one
-- argument per subject: its entry, 'bucket amount ...'.
for s = 4, #ARGV do
  local hash, expiry = KEYS[2 * (s - 3) - 1], KEYS[2 * (s - 3)]
  redis.call('HSET', hash, ARGV[1], ARGV[s])
  redis.call('ZADD', expiry, ARGV[2], ARGV[1])
  redis.call('PEXPIRE', hash, ARGV[3])
  redis.call('PEXPIRE', expiry, ARGV[3])
end
return #ARGV - 3
