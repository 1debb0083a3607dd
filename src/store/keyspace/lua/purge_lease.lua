local e = redis.call('HGET', KEYS[1], 'expires_at')
if not e then return {0} end
if tonumber(e) > tonumber(ARGV[1]) then return {2, e} end
redis.call('DEL', KEYS[1])
return {1}
