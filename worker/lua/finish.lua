-- Settle a batch in one step: store its results, acknowledge its messages, publish its events.
-- KEYS: the n result keys, then the queue's unacked hash and unacked index.
-- ARGV: result expiry (s), n, the n results, m, the m tags, then (channel, message) pairs to
--       publish (task events).
-- A stored SUCCESS is never overwritten (as Celery's Redis backend); anything else is, even
-- a key of another type someone put there (GET's error is taken, not raised: one odd key
-- must not fail the acknowledgment of a whole batch). Each stored result is published on
-- its key's channel, where Celery's clients wait for it.
local n = tonumber(ARGV[2])
for i = 1, n do
  local value = ARGV[2 + i]
  local keep = false
  local current = redis.pcall('GET', KEYS[i])
  if type(current) == 'string' then
    local ok, meta = pcall(cjson.decode, current)
    keep = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
  end
  if not keep then
    redis.call('SET', KEYS[i], value, 'EX', ARGV[1])
    redis.call('PUBLISH', KEYS[i], value)
  end
end
local base = 3 + n
local m = tonumber(ARGV[base])
if m > 0 then
  local tags = {unpack(ARGV, base + 1, base + m)}
  redis.call('ZREM', KEYS[n + 2], unpack(tags))
  redis.call('HDEL', KEYS[n + 1], unpack(tags))
end
for i = base + m + 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return n
