-- The order-set members of some seqs: false where the slot is empty or its identity gone.
-- KEYS[1] order set, KEYS[2] the id-slots prefix (append seq // G_ID_BLOCK); ARGV the seqs
local out = {}
for i = 1, #ARGV do
  local seq = tonumber(ARGV[i])
  local at = (seq % G_ID_BLOCK) * 26
  local id = redis.call('GETRANGE', KEYS[2] .. math.floor(seq / G_ID_BLOCK), at, at + 25)
  local member = false
  if #id == 26 and string.byte(id, 1) ~= 0 then
    local found = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. id .. '\0', '(' .. id .. '\1',
      'LIMIT', 0, 1)
    member = found[1] or false
  end
  out[i] = member
end
return out
