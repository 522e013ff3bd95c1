-- Take up to a fair share of a queue's waiting messages into its unacknowledged set.
-- KEYS: the queue's lists in the order they are consumed (k of them), then its unacked hash,
--       unacked index (tag -> lease: when taken or last touched), deliveries hash and tag
--       counter.
-- ARGV: now, largest item returned whole (bytes), most to take, processes sharing the queue,
--       k, bytes of an over-size item's tail to return.
-- Nothing is parsed here: every item, whatever its bytes, gets a tag of this script's own, so
-- it can always be acknowledged, and a delivery count under its digest. An item over the size
-- limit is not returned whole: its size and tail are (the tail is where kombu puts headers).
local k = tonumber(ARGV[5])
local unacked, index, deliveries, counter = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
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
    local size = string.len(item)
    local tag = tostring(redis.call('INCR', counter))
    local digest
    if size <= limit then
      digest = redis.sha1hex(item)
    else
      -- Hashing a huge item would hold Redis up: its size, head and tail identify it.
      digest = redis.sha1hex(size .. ':' .. string.sub(item, 1, 65536) .. string.sub(item, -65536))
    end
    redis.call('HSET', unacked, tag, item)
    redis.call('ZADD', index, ARGV[1], tag)
    local count = redis.call('HINCRBY', deliveries, digest, 1)
    if size <= limit then
      table.insert(taken, {tag, count, digest, item})
    else
      table.insert(taken, {tag, count, digest, size, string.sub(item, -tail)})
    end
  end
  if #taken >= want then
    break
  end
end
return taken
