local f = redis.call('HMGET', KEYS[1], 'state', 'version')
if not f[1] then return {0} end
if f[1] ~= 'active' or tonumber(f[2]) ~= tonumber(ARGV[1]) then
  return {2, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'version', tostring(tonumber(ARGV[1]) + 1),
  'absolute_expires_at', ARGV[3], 'idle_expires_at', ARGV[4], 'last_accessed_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'ip_address')
return {1}
