local f = redis.call('HMGET', KEYS[1], 'holder', 'version', 'expires_at')
if f[1] and tonumber(f[3]) > tonumber(ARGV[4]) then return {0, f[1], f[2], f[3]} end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'version', ARGV[2], 'expires_at', ARGV[3])
return {1}
