-- Park taken messages whose time has not come (eta, countdown, rate limit) in the delayed set.
-- KEYS: the queue's unacked hash, unacked index, delayed set, delayed items.
-- ARGV: (tag, due time, member) triples.
-- A parked message is not unacknowledged, so no visibility timeout can deliver it early or
-- twice; its delivery ended cleanly, so it is not counted, and its task-received has been
-- announced ("r" in its count, see take.lua).
local moved = 0
for i = 1, #ARGV, 3 do
  local tag, due, member = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local item = redis.call('HGET', KEYS[1], tag)
  if item then
    local digits, _, rest = string.match(item, '^%zcw:(%d+)(r?):()')
    if digits then
      item = '\0cw:' .. (tonumber(digits) - 1) .. 'r:' .. string.sub(item, rest)
    end
    redis.call('ZADD', KEYS[3], due, member)
    redis.call('HSET', KEYS[4], member, item)
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
    moved = moved + 1
  end
end
return moved
