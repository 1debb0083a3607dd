redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
local id = redis.call('HGET', KEYS[1], 'id')
local seq = redis.call('HGET', KEYS[2], ARGV[2])
if not seq then return {id, {}} end
return {id, redis.call('XRANGE', KEYS[3], seq .. '-0', seq .. '-0')}
