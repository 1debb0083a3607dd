local f = redis.call('HMGET', KEYS[1], 'state', 'idle_expires_at', 'last_accessed_at')
if f[1] ~= 'active' then return 0 end
if tonumber(ARGV[2]) > tonumber(f[2]) then redis.call('HSET', KEYS[1], 'idle_expires_at', ARGV[2]) end
if tonumber(ARGV[1]) > tonumber(f[3]) then redis.call('HSET', KEYS[1], 'last_accessed_at', ARGV[1]) end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'ip_address', ARGV[4]) end
return 1
