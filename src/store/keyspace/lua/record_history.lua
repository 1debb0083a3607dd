local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1)) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then out[#out + 1] = v end
end
return out
