local id = redis.call('HGET', KEYS[1], 'id')
if not id or id == ARGV[1] then redis.call('HSET', KEYS[1], 'id', ARGV[2]) end
return redis.call('HGET', KEYS[1], 'id')
