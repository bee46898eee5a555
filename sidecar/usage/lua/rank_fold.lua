-- Move a merged identity's places in the daily top sets to its survivor (identity/merge.py):
-- its score is added to the survivor's and it leaves the set; it leaves the rankings too
-- (they are rebuilt from the top sets). Safe to run again: a moved member is gone.
-- KEYS: the top sets, then the rankings. ARGV[1] merged _id, ARGV[2] survivor _id,
-- ARGV[3] how many of the keys are top sets.
local tops = tonumber(ARGV[3])
for i = 1, #KEYS do
  if i <= tops then
    local score = redis.call('ZSCORE', KEYS[i], ARGV[1])
    if score then redis.call('ZINCRBY', KEYS[i], score, ARGV[2]) end
  end
  redis.call('ZREM', KEYS[i], ARGV[1])
end
return 1
