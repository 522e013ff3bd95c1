-- Put back messages whose lease is older than the visibility timeout (their node is gone).
-- KEYS: the queue's first list, unacked hash, unacked index.
-- ARGV: the latest take time to restore, most to restore.
-- One script, so no mutex: two consumers sweeping at once cannot restore a message twice.
local tags = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = #tags, 1, -1 do
  local tag = tags[i]
  local item = redis.call('HGET', KEYS[2], tag)
  if item then
    redis.call('RPUSH', KEYS[1], item)
  end
  redis.call('HDEL', KEYS[2], tag)
  redis.call('ZREM', KEYS[3], tag)
end
return #tags
