redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'id', 'head', 'trimmed')
local head = tonumber(m[2] or '0')
local after = tonumber(ARGV[2])
local through = head
if ARGV[3] ~= '' then through = tonumber(ARGV[3]) end
local limit = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local out = {}
local function live(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'exp' then return tonumber(f[i + 1]) > now end
  end
  return false
end
if after < through and limit > 0 then
  if ARGV[6] == '1' then
    local offset = 0
    while #out < limit do
      local seqs = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], through, 'LIMIT', offset, 128)
      if #seqs == 0 then break end
      offset = offset + #seqs
      for _, seq in ipairs(seqs) do
        local e = redis.call('XRANGE', KEYS[2], seq .. '-0', seq .. '-0')
        if e[1] and live(e[1]) then
          out[#out + 1] = e[1]
          if #out >= limit then break end
        end
      end
    end
  else
    local start = ARGV[7]
    local stop = string.format('%d-0', through)
    while #out < limit do
      local es = redis.call('XRANGE', KEYS[2], start, stop, 'COUNT', 128)
      if #es == 0 then break end
      for _, e in ipairs(es) do
        if live(e) then
          out[#out + 1] = e
          if #out >= limit then break end
        end
      end
      start = string.format('%d-0', tonumber(string.match(es[#es][1], '^(%d+)')) + 1)
    end
  end
end
return {m[1], head, tonumber(m[3] or '0'), out}
