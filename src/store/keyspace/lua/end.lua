local KEYS, ARGV = K, V
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0} end
if state ~= 'active' then return {2, redis.call('HGETALL', KEYS[1])} end
local ids = redis.call('HMGET', KEYS[1], 'session_id', 'user_id')
if ARGV[5] ~= '' then
  local bad = unwritable(ids[2])
  if bad then return {3, bad} end
end
local version = tonumber(redis.call('HGET', KEYS[1], 'version')) + 1
-- Kept (and listed) until the later of retain-until and the absolute expiry.
local retain = ARGV[4]
local absolute = redis.call('HGET', KEYS[1], 'absolute_expires_at')
if absolute and tonumber(absolute) > tonumber(retain) then retain = absolute end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'end_reason', ARGV[2], 'ended_at', ARGV[3],
  'retain_until', retain, 'version', tostring(version))
if ARGV[5] ~= '' then
  emit(ids[1], ids[2], ARGV[5], ARGV[2], ARGV[6], ARGV[3], retain)
end
return {1, redis.call('HGETALL', KEYS[1])}
