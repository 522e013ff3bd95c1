-- Hand parked messages whose time has come back to the consuming end of their queue.
-- KEYS: the queue's first list, delayed set, delayed items.
-- ARGV: now, most to move.
-- Returns {moved, due time of the next parked message or ''}.
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = #due, 1, -1 do
  local member = due[i]
  local item = redis.call('HGET', KEYS[3], member)
  if item then
    redis.call('RPUSH', KEYS[1], item)
  end
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
end
local following = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {#due, following[2] or ''}
