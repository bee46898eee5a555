-- Walk the order set from a bound, keeping the identities that match, within a budget.
-- KEYS[1] order set
-- ARGV[1] lex bound, ARGV[2] '1' newest first, ARGV[3] lower-case needle ('' for none),
-- ARGV[4] matches wanted, ARGV[5] members to look at, at most, ARGV[6..] tags (any of).
-- Returns {matching members, bound to continue from, or '' when the walk ended}.
-- A member is: _id (26 characters), NUL, then external id, name and email in lower case,
-- NUL-separated, then \1tag\1tag\1. Matching starts after the _id.
local order = KEYS[1]
local bound, reverse, needle = ARGV[1], ARGV[2] == '1', ARGV[3]
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local tags = {}
for i = 6, #ARGV do tags[#tags + 1] = '\1' .. ARGV[i] .. '\1' end
local find = string.find
local found = {}
local seen = 0
while seen < budget do
  local n = math.min(1000, budget - seen)
  local batch
  if reverse then
    batch = redis.call('ZREVRANGEBYLEX', order, bound, '-', 'LIMIT', 0, n)
  else
    batch = redis.call('ZRANGEBYLEX', order, bound, '+', 'LIMIT', 0, n)
  end
  for i = 1, #batch do
    local member = batch[i]
    local ok = true
    if needle ~= '' then
      local at = find(member, needle, 28, true)
      ok = at ~= nil and at + #needle <= find(member, '\1', 28, true)
    end
    if ok and #tags > 0 then
      ok = false
      for j = 1, #tags do
        if find(member, tags[j], 28, true) then
          ok = true
          break
        end
      end
    end
    if ok then
      found[#found + 1] = member
      if #found >= want then return {found, ''} end
    end
  end
  if #batch < n then return {found, ''} end
  seen = seen + n
  if reverse then
    bound = '(' .. string.sub(batch[n], 1, 26)
  else
    bound = '(' .. string.sub(batch[n], 1, 26) .. '\1'
  end
end
return {found, bound}
