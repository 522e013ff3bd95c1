-- Put taken messages back at the consuming end of their queue, at once.
-- KEYS: the queue's first list, unacked hash, unacked index, deliveries hash.
-- ARGV: 1 when the delivery ended cleanly (it is not counted) else 0, then (tag, digest) pairs.
-- A tag no longer unacknowledged (settled meanwhile) is skipped.
local moved = 0
for i = #ARGV - 1, 2, -2 do
  local tag, digest = ARGV[i], ARGV[i + 1]
  local item = redis.call('HGET', KEYS[2], tag)
  if item then
    redis.call('RPUSH', KEYS[1], item)
    redis.call('HDEL', KEYS[2], tag)
    redis.call('ZREM', KEYS[3], tag)
    if ARGV[1] == '1' and redis.call('HINCRBY', KEYS[4], digest, -1) <= 0 then
      redis.call('HDEL', KEYS[4], digest)
    end
    moved = moved + 1
  end
end
return moved
