local f = redis.call('HMGET', KEYS[1], 'holder', 'expires_at')
if f[1] ~= ARGV[1] or tonumber(f[2]) <= tonumber(ARGV[3]) then return 0 end
if tonumber(ARGV[2]) > tonumber(f[2]) then redis.call('HSET', KEYS[1], 'expires_at', ARGV[2]) end
return 1
