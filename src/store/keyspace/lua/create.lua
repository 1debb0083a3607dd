local KEYS, ARGV = K, V
local now = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local active = {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local f = redis.call('HMGET', ARGV[1] .. h, 'state', 'idle_expires_at', 'absolute_expires_at', 'created_at', 'session_id')
  if not f[1] then
    redis.call('ZREM', KEYS[3], h)
  elseif f[1] == 'active' and now < tonumber(f[2]) and now < tonumber(f[3]) then
    active[#active + 1] = {tonumber(f[4]), f[5], h, f[3]}
  end
end
table.sort(active, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local evicting = math.min(#active + 1 - cap, #active)
if evicting > 0 and ARGV[18] ~= '' then
  local bad = unwritable(ARGV[10])
  if bad then return {'!log', bad} end
end
local evicted = {}
for i = 1, evicting do
  local key = ARGV[1] .. active[i][3]
  local version = tonumber(redis.call('HGET', key, 'version')) + 1
  -- Kept (and listed) until the later of retain-until and the absolute expiry.
  local retain = ARGV[6]
  if tonumber(active[i][4]) > tonumber(retain) then retain = active[i][4] end
  redis.call('HSET', key, 'state', ARGV[4], 'end_reason', ARGV[5], 'ended_at', ARGV[2],
    'retain_until', retain, 'version', tostring(version))
  if ARGV[18] ~= '' then
    emit(active[i][2], ARGV[10], ARGV[18], ARGV[5], ARGV[19], ARGV[2], retain)
  end
  evicted[#evicted + 1] = redis.call('HGETALL', key)
end
redis.call('HSET', KEYS[1], 'doc', ARGV[8], 'session_id', ARGV[9], 'user_id', ARGV[10],
  'created_at', ARGV[11], 'absolute_expires_at', ARGV[12], 'idle_expires_at', ARGV[13],
  'last_accessed_at', ARGV[14], 'retain_until', ARGV[15], 'version', ARGV[16], 'state', ARGV[17])
redis.call('SET', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[11], ARGV[7])
return evicted
