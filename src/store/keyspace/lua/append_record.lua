redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if excess <= 0 then return {} end
local old = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
redis.call('HDEL', KEYS[1], unpack(old))
return old
