local h = redis.call('GET', KEYS[1])
if not h then return {} end
return redis.call('HGETALL', ARGV[1] .. h)
