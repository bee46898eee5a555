-- Walk the identities in ULID order from a bound, keeping those that match, within a budget.
-- KEYS[1] order set, KEYS[2] search hash
-- ARGV[1] lex bound ('(' .. _id, or '+' / '-'), ARGV[2] '1' newest first, ARGV[3] lower-case
-- needle ('' for none), ARGV[4] matches wanted, ARGV[5] entries to look at, at most,
-- ARGV[6..] tags (any of).
-- Returns {matching _ids, bound to continue from or '' when the walk ended}.
-- Search text layout: external id, name, email (lower case, NUL-separated), then \1tag\1tag\1.
local order, search = KEYS[1], KEYS[2]
local bound, reverse, needle = ARGV[1], ARGV[2] == '1', ARGV[3]
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local tags = {}
for i = 6, #ARGV do tags[#tags + 1] = '\1' .. ARGV[i] .. '\1' end
local found = {}
local seen = 0
while seen < budget do
  local n = math.min(256, budget - seen)
  local batch
  if reverse then
    batch = redis.call('ZREVRANGEBYLEX', order, bound, '-', 'LIMIT', 0, n)
  else
    batch = redis.call('ZRANGEBYLEX', order, bound, '+', 'LIMIT', 0, n)
  end
  if #batch == 0 then return {found, ''} end
  local texts = redis.call('HMGET', search, unpack(batch))
  for i = 1, #batch do
    local text = texts[i]
    local ok = text ~= false
    if ok and needle ~= '' then
      local at = string.find(text, needle, 1, true)
      ok = at ~= nil and at + #needle <= string.find(text, '\1', 1, true)
    end
    if ok and #tags > 0 then
      ok = false
      for j = 1, #tags do
        if string.find(text, tags[j], 1, true) then
          ok = true
          break
        end
      end
    end
    if ok then
      found[#found + 1] = batch[i]
      if #found >= want then return {found, ''} end
    end
  end
  seen = seen + #batch
  bound = '(' .. batch[#batch]
  if #batch < n then return {found, ''} end
end
return {found, bound}
