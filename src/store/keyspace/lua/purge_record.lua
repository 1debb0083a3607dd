local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0}
end
local cut = string.find(v, '\n', 1, true)
local at = string.sub(v, 1, cut - 1)
if tonumber(at) > tonumber(ARGV[2]) then return {2, at} end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {1}
