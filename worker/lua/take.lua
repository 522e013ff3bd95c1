-- Take up to a fair share of a queue's waiting messages into its unacknowledged set.
-- KEYS: the queue's lists in the order they are consumed (k of them), then its unacked hash,
--       unacked index (tag -> lease: when taken or last touched) and tag counter.
-- ARGV: now, largest item returned whole (bytes), most to take, free slots sharing the
--       queue, k, bytes of an over-size item's tail to return.
-- Nothing is parsed here: every item, whatever its bytes, gets a tag of this script's own,
-- so it can always be acknowledged. A message that comes back (requeued, restored,
-- promoted) carries its delivery count in front of it, "\0cw:<count>[r]:" ("r": its
-- task-received was announced when it was parked), which this script reads, adds one to,
-- and keeps with it while it is unacknowledged; producers' messages have none (count 0).
-- An item over the size limit is not returned whole: its size and tail are (the tail is
-- where kombu writes the headers).
local k = tonumber(ARGV[5])
local unacked, index, counter = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
local waiting = 0
for i = 1, k do
  waiting = waiting + redis.call('LLEN', KEYS[i])
end
local want = math.max(1, math.min(tonumber(ARGV[3]), math.ceil(waiting / tonumber(ARGV[4]))))
local limit = tonumber(ARGV[2])
local tail = tonumber(ARGV[6])
local taken = {}
for i = 1, k do
  while #taken < want do
    local item = redis.call('RPOP', KEYS[i])
    if not item then
      break
    end
    local count, flags, raw = 0, '', item
    if string.sub(item, 1, 4) == '\0cw:' then
      local digits, marks, rest = string.match(item, '^(%d+)(r?):()', 5)
      if digits and string.len(digits) <= 9 then
        count, flags, raw = tonumber(digits), marks, string.sub(item, rest)
      end
    end
    count = count + 1
    local tag = tostring(redis.call('INCR', counter))
    redis.call('HSET', unacked, tag, '\0cw:' .. count .. flags .. ':' .. raw)
    redis.call('ZADD', index, ARGV[1], tag)
    local size = string.len(raw)
    if size <= limit then
      table.insert(taken, {tag, count, flags, raw})
    else
      table.insert(taken, {tag, count, flags, size, string.sub(raw, -tail)})
    end
  end
  if #taken >= want then
    break
  end
end
return taken
