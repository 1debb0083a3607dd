local limit = tonumber(ARGV[4])
local types = nil
if #ARGV > 4 then
  types = {}
  for i = 5, #ARGV do types[ARGV[i]] = true end
end
local max = ARGV[2]
if ARGV[3] == '' then max = '(' .. ARGV[2] end
local upper = tonumber(ARGV[2])
-- Byte order, as sorted sets and Rust order strings (Lua's `<` follows the server's locale).
local function below(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local out = {}
local offset = 0
while #out < limit do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[2], max, ARGV[1], 'WITHSCORES', 'LIMIT', offset, 128)
  if #page == 0 then break end
  offset = offset + #page / 2
  for i = 1, #page, 2 do
    local id, score = page[i], tonumber(page[i + 1])
    if ARGV[3] == '' or score < upper or below(id, ARGV[3]) then
      local value = redis.call('HGET', KEYS[1], id)
      if value then
        local cut = string.find(value, '\n', 1, true)
        if cut and (types == nil or types[string.sub(value, 1, cut - 1)]) then
          out[#out + 1] = string.sub(value, cut + 1)
          if #out >= limit then break end
        end
      end
    end
  end
end
return out
