-- Put taken messages back at the consuming end of their queue, at once.
-- KEYS: the queue's first list, unacked hash, unacked index.
-- ARGV: 1 when the delivery ended cleanly (it is not counted) else 0, then tags.
-- A message goes back with its delivery count in front of it (see take.lua); a tag no
-- longer unacknowledged (settled meanwhile) is skipped.
local moved = 0
for i = #ARGV, 2, -1 do
  local tag = ARGV[i]
  local item = redis.call('HGET', KEYS[2], tag)
  if item then
    if ARGV[1] == '1' then
      local digits, marks, rest = string.match(item, '^%zcw:(%d+)(r?):()')
      if digits then
        local count = tonumber(digits) - 1
        item = '\0cw:' .. count .. marks .. ':' .. string.sub(item, rest)
      end
    end
    redis.call('RPUSH', KEYS[1], item)
    redis.call('HDEL', KEYS[2], tag)
    redis.call('ZREM', KEYS[3], tag)
    moved = moved + 1
  end
end
return moved
