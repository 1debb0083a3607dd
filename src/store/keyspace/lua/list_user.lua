local out = {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local r = redis.call('HGETALL', ARGV[1] .. h)
  if #r > 0 then out[#out + 1] = r end
end
return out
