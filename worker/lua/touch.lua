-- Renew the lease of messages a live node is still working on.
-- KEYS: the queue's unacked index.
-- ARGV: now, then tags.
-- Only tags still unacknowledged are touched (XX): a settled one is not brought back.
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
end
return #ARGV - 1
