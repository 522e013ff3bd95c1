-- Put back what earlier versions of this worker left behind for a queue: messages in kombu's
-- own unacknowledged set (its `unacked` hash and `unacked_index`), and items in the queue's
-- old quarantine list. Only entries older than the visibility timeout are taken, so a
-- consumer of an earlier version still running during an upgrade keeps its own.
-- KEYS: the queue's first list, kombu's unacked hash, kombu's unacked index, the old
--       quarantine list.
-- ARGV: the queue's name, the latest time to restore, most to restore.
-- Entries of other queues (other applications on the same Redis) are left alone.
local moved = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  local tags = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
  for _, tag in ipairs(tags) do
    local entry = redis.call('HGET', KEYS[2], tag)
    if not entry then
      redis.call('ZREM', KEYS[3], tag)
    else
      local ok, decoded = pcall(cjson.decode, entry)
      if ok and type(decoded) == 'table' and decoded[3] == ARGV[1] then
        local payload = decoded[1]
        if type(payload) ~= 'string' then
          payload = cjson.encode(payload)
        end
        redis.call('RPUSH', KEYS[1], payload)
        redis.call('HDEL', KEYS[2], tag)
        redis.call('ZREM', KEYS[3], tag)
        moved = moved + 1
      end
    end
  end
end
while true do
  local item = redis.call('RPOPLPUSH', KEYS[4], KEYS[1])
  if not item then
    break
  end
  moved = moved + 1
end
return moved
