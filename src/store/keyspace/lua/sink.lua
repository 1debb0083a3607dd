local sink = {mode = ARGV[1], newid = ARGV[2], users = ARGV[3],
  meta = KEYS[1], stream = KEYS[2], sess = KEYS[3], exp = KEYS[4]}
local K = {unpack(KEYS, 5)}
local V = {unpack(ARGV, 4)}
-- The first key `emit` for user `uid` would fail on (a foreign value under our prefix, a head
-- that is not a number, a stream whose last id is not below the next seq), or nil. Scripts call
-- it before their first write, so a session never ends without its event.
local function unwritable(uid)
  local want = {{sink.meta, 'stream'}}
  if sink.mode ~= 'outbox' then
    want = {{sink.meta, 'hash'}, {sink.stream, 'stream'}, {sink.sess, 'hash'},
      {sink.users .. uid, 'zset'}, {sink.exp, 'zset'}}
  end
  for _, kt in ipairs(want) do
    local t = redis.call('TYPE', kt[1]).ok
    if t ~= 'none' and t ~= kt[2] then return kt[1] end
  end
  if sink.mode == 'outbox' then return nil end
  local head = redis.call('HGET', sink.meta, 'head')
  if head and not tonumber(head) then return sink.meta end
  if redis.call('EXISTS', sink.stream) == 1 then
    local info = redis.call('XINFO', 'STREAM', sink.stream)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local last = tonumber((string.match(info[i + 1], '^(%d+)')))
        if last and last >= tonumber(head or '0') + 1 then return sink.stream end
      end
    end
  end
  return nil
end
local function emit(sid, uid, kind, reason, by, at, expires)
  if sink.mode == 'outbox' then
    redis.call('XADD', sink.meta, '*', 'sid', sid, 'uid', uid, 'kind', kind, 'reason', reason,
      'by', by, 'at', at, 'exp', expires)
    return 0
  end
  if sink.mode == 'drain' and redis.call('HEXISTS', sink.sess, sid) == 1 then return 0 end
  redis.call('HSETNX', sink.meta, 'id', sink.newid)
  local seq = redis.call('HINCRBY', sink.meta, 'head', 1)
  redis.call('XADD', sink.stream, seq .. '-0', 'sid', sid, 'uid', uid, 'kind', kind,
    'reason', reason, 'by', by, 'at', at, 'exp', expires)
  redis.call('HSET', sink.sess, sid, seq)
  redis.call('ZADD', sink.users .. uid, seq, seq)
  redis.call('ZADD', sink.exp, expires, seq)
  return 1
end
