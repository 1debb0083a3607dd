local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local trimmed = tonumber(redis.call('HGET', KEYS[1], 'trimmed') or '0')
for _, seq in ipairs(due) do
  local e = redis.call('XRANGE', KEYS[2], seq .. '-0', seq .. '-0')
  if e[1] then
    local f = e[1][2]
    local sid, uid
    for i = 1, #f, 2 do
      if f[i] == 'sid' then sid = f[i + 1] elseif f[i] == 'uid' then uid = f[i + 1] end
    end
    redis.call('XDEL', KEYS[2], seq .. '-0')
    if sid and redis.call('HGET', KEYS[3], sid) == seq then redis.call('HDEL', KEYS[3], sid) end
    if uid then redis.call('ZREM', ARGV[3] .. uid, seq) end
  end
  redis.call('ZREM', KEYS[4], seq)
  if tonumber(seq) > trimmed then trimmed = tonumber(seq) end
end
if #due > 0 then redis.call('HSET', KEYS[1], 'trimmed', string.format('%d', trimmed)) end
return #due
