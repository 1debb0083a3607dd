local f = redis.call('HMGET', KEYS[1], 'retain_until', 'session_id', 'user_id')
if not f[1] then return {0} end
if tonumber(f[1]) > tonumber(ARGV[2]) then return {2, f[1]} end
redis.call('DEL', KEYS[1])
redis.call('DEL', ARGV[1] .. 'id:' .. f[2])
redis.call('ZREM', ARGV[1] .. 'u:' .. f[3], ARGV[3])
return {1}
