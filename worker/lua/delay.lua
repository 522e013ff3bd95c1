-- Park taken messages whose time has not come (eta, countdown, rate limit) in the delayed set.
-- KEYS: the queue's unacked hash, unacked index, deliveries hash, delayed set, delayed items.
-- ARGV: (tag, digest, due time, member) quadruples.
-- A parked message is not unacknowledged, so no visibility timeout can deliver it early or
-- twice; its delivery ended cleanly, so it is not counted.
local moved = 0
for i = 1, #ARGV, 4 do
  local tag, digest, due, member = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local item = redis.call('HGET', KEYS[1], tag)
  if item then
    redis.call('ZADD', KEYS[4], due, member)
    redis.call('HSET', KEYS[5], member, item)
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
    if redis.call('HINCRBY', KEYS[3], digest, -1) <= 0 then
      redis.call('HDEL', KEYS[3], digest)
    end
    moved = moved + 1
  end
end
return moved
