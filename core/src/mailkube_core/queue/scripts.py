"""Lua scripts of the queue. Each touches the keys of one partition only (one hash tag), so
each is atomic on Redis Cluster too. GROUP is the consumer group, `workers`."""

# KEYS[1] messages index; per message i: KEYS[2i] message hash, KEYS[2i+1] its lane's stream.
# ARGV[1] now (ms), ARGV[2] body; per message i: ARGV[3i] id, ARGV[3i+1] lane, ARGV[3i+2] envelope.
ENQUEUE = """
local n = (#KEYS - 1) / 2
for i = 1, n do
  local id = ARGV[3*i]
  redis.call('HSET', KEYS[2*i], 'envelope', ARGV[3*i+2], 'body', ARGV[2],
             'lane', ARGV[3*i+1], 'attempts', 0, 'deliveries', 0)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
  redis.call('XADD', KEYS[2*i+1], '*', 'id', id)
end
return n
"""

# After XREADGROUP/XAUTOCLAIM handed us entries (all of one partition, so one slot): mark each
# claim and load each message, in one round trip.
# KEYS message hashes. ARGV[1] consumer, ARGV[2] now (ms).
# Returns one item per key: the hash's fields, or an empty list when the message was deleted.
LOAD_CLAIMED = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[i] = {}
  else
    redis.call('HINCRBY', key, 'deliveries', 1)
    redis.call('HSET', key, 'claimed_by', ARGV[1], 'claimed_at', ARGV[2])
    out[i] = redis.call('HGETALL', key)
  end
end
return out
"""

# Drop a stream entry whose message is gone (deleted from the CLI).
# KEYS[1] stream. ARGV[1] entry id.
DROP_ENTRY = """
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
return redis.call('XDEL', KEYS[1], ARGV[1])
"""

# Keep a claim alive during a long delivery, only while we still own it.
# KEYS[1] stream. ARGV[1] entry id, ARGV[2] consumer.
EXTEND = """
local p = redis.call('XPENDING', KEYS[1], 'workers', ARGV[1], ARGV[1], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], 'workers', ARGV[2], 0, ARGV[1], 'JUSTID')
return 1
"""

# Per-recipient results, without resurrecting a deleted message.
# KEYS[1] message hash. ARGV field, value pairs.
RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# Done with the message: every recipient delivered or failed (and reported).
# KEYS[1] message hash, KEYS[2] stream, KEYS[3] messages index, KEYS[4] delayed.
# ARGV[1] entry id, ARGV[2] message id.
FINISH = """
redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return redis.call('DEL', KEYS[1])
"""

# Temporary failure: out of the stream, into the delayed set until ARGV[3]; `deliveries` (claims
# since the last attempt) starts again at 0. Only the consumer whose ack lands reschedules, so
# two consumers racing on a reclaimed entry defer it once.
# KEYS[1] message hash, KEYS[2] stream, KEYS[3] delayed.
# ARGV[1] entry id, ARGV[2] message id, ARGV[3] due (ms), ARGV[4] last error.
DEFER = """
local acked = redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if acked == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_error', ARGV[4], 'deliveries', 0)
redis.call('HDEL', KEYS[1], 'claimed_by', 'claimed_at')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# The due-mover: delayed entries whose time has come go back to the stream. Any worker may
# run it at any time; ZREM before XADD inside one script means each comes back exactly once.
# KEYS[1] delayed, KEYS[2] stream. ARGV[1] now (ms), ARGV[2] most to move.
MOVE_DUE = """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
return #ids
"""

# Retry a deferred message now. KEYS[1] delayed, KEYS[2] stream. ARGV[1] message id.
RETRY_NOW = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
return 1
"""

# Delete a message wherever it is; a stream entry left behind is dropped when claimed.
# KEYS[1] message hash, KEYS[2] messages index, KEYS[3..] delayed sets. ARGV[1] message id.
DELETE = """
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

# Everything about a message but its body, for the CLI.
# KEYS[1] message hash, KEYS[2..] delayed sets (in LANES order).
# Returns the hash's fields without `body`, plus body_size and due_<lane> when deferred.
PEEK = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return false end
local out = {}
for i = 1, #fields, 2 do
  if fields[i] ~= 'body' then
    out[#out+1] = fields[i]; out[#out+1] = fields[i+1]
  end
end
out[#out+1] = 'body_size'; out[#out+1] = tostring(redis.call('HSTRLEN', KEYS[1], 'body'))
for i = 2, #KEYS do
  local due = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if due then out[#out+1] = 'due'; out[#out+1] = due end
end
return out
"""
