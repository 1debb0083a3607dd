redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'id', 'head', 'trimmed')
local entries = {}
if tonumber(ARGV[3]) > 0 then
  entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])
end
return {m[1], tonumber(m[2] or '0'), tonumber(m[3] or '0'), entries}
