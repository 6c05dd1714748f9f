"""Lua scripts of the queue. Each touches the keys of one partition only (one hash tag), so
each is atomic on Redis Cluster too. GROUP is the consumer group, `workers`."""

# After XREADGROUP/XAUTOCLAIM handed us entries (all of one partition, so one slot): mark each
# claim; the same transaction then reads each message with HGETALL (Queue._load), so that no
# body passes through Lua (Redis hashes every Lua string byte by byte).
# KEYS message hashes. ARGV[1] consumer, ARGV[2] now (ms).
LOAD_CLAIMED = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'deliveries', 1)
    redis.call('HSET', key, 'claimed_by', ARGV[1], 'claimed_at', ARGV[2])
  end
end
return #KEYS
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

# Per-recipient results and what they count, without resurrecting a deleted message. Each tally
# item is appended (as one stream entry per call) only if its marker field is new, so a result
# recorded twice (a retry after a crash, two consumers racing) counts once. A forward (a new
# message for the remote lane that delivering a recipient made: forward_to) is queued in the
# same script as that recipient's result, and only if its marker is new: exactly once, however
# often the recipient is handled.
# KEYS[1] message hash, KEYS[2] the partition's tally stream, KEYS[3] messages index, KEYS[4]
# the remote lane's stream, KEYS[5..4+f] the new messages' hashes.
# ARGV[1] n, ARGV[2] k, ARGV[3] f, ARGV[4] now (ms); then n field, value pairs; k marker, item
# (JSON) pairs; f marker, new id, envelope, body quadruples.
# Returns 0 if the message is gone, else 1 + how many forwards were queued now.
RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n, k, f = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a = 5
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, a, a + 2 * n - 1)) end
a = a + 2 * n
local items = {}
local queued = 0
for i = a, a + 2 * k - 1, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], 1) == 1 then items[#items + 1] = ARGV[i + 1] end
end
a = a + 2 * k
if #items > 0 then
  redis.call('XADD', KEYS[2], '*', 'items', '[' .. table.concat(items, ',') .. ']')
end
for i = 1, f do
  if redis.call('HSETNX', KEYS[1], ARGV[a], 1) == 1 then
    redis.call('HSET', KEYS[4 + i], 'envelope', ARGV[a + 2], 'body', ARGV[a + 3],
               'lane', 'remote', 'attempts', 0, 'deliveries', 0)
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[a + 1])
    redis.call('XADD', KEYS[4], '*', 'id', ARGV[a + 1])
    queued = queued + 1
  end
  a = a + 4
end
return 1 + queued
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

# A batch of messages whose every recipient is delivered (the local and remote lanes'
# batches): count what each delivery counts, as RECORD does (an item only if its marker is not
# in the message's hash yet: an earlier attempt that died after recording it counted it), all
# in one tally entry; queue the new messages a delivery made (forward_to a remote address: the
# remote lane of this partition), only for a message still there, so a forward is queued
# exactly once however often the claim is handled; then remove each message as FINISH does.
# One round trip for the whole batch.
# KEYS[1] the partition's tally stream, KEYS[2] messages index, KEYS[3] stream, KEYS[4]
# delayed, KEYS[5] the remote lane's stream, KEYS[6..5+n] the message hashes, then the new
# messages' hashes. ARGV[1] n, ARGV[2] now (ms); then per message, in KEYS order: entry id,
# message id, k, f, k marker, item (JSON) pairs, then f new id, envelope, body triples.
# Returns how many messages were still there (the others were deleted meanwhile).
FINISH_DELIVERED = """
local n = tonumber(ARGV[1])
local items = {}
local found = 0
local a = 3
local new = 6 + n
for i = 6, 5 + n do
  local entry, id, k, f = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local there = redis.call('EXISTS', KEYS[i]) == 1
  if there then
    found = found + 1
    for j = a, a + 2 * k - 1, 2 do
      if redis.call('HEXISTS', KEYS[i], ARGV[j]) == 0 then items[#items + 1] = ARGV[j + 1] end
    end
  end
  a = a + 2 * k
  for j = a, a + 3 * f - 1, 3 do
    if there then
      redis.call('HSET', KEYS[new], 'envelope', ARGV[j + 1], 'body', ARGV[j + 2],
                 'lane', 'remote', 'attempts', 0, 'deliveries', 0)
      redis.call('ZADD', KEYS[2], ARGV[2], ARGV[j])
      redis.call('XADD', KEYS[5], '*', 'id', ARGV[j])
    end
    new = new + 1
  end
  a = a + 3 * f
  if there then redis.call('DEL', KEYS[i]) end
  redis.call('XACK', KEYS[3], 'workers', entry)
  redis.call('XDEL', KEYS[3], entry)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[4], id)
end
if #items > 0 then
  redis.call('XADD', KEYS[1], '*', 'items', '[' .. table.concat(items, ',') .. ']')
end
return found
"""

# Temporary failure: out of the stream, into the delayed set until ARGV[3]; `deliveries` (claims
# since the last attempt) starts again at 0. Only the consumer whose ack lands reschedules (and
# counts the deferral), so two consumers racing on a reclaimed entry defer it once.
# KEYS[1] message hash, KEYS[2] stream, KEYS[3] delayed, KEYS[4] the partition's tally stream.
# ARGV[1] entry id, ARGV[2] message id, ARGV[3] due (ms), ARGV[4] last error, ARGV[5] the
# deferred recipients' tally item (JSON).
DEFER = """
local acked = redis.call('XACK', KEYS[2], 'workers', ARGV[1])
redis.call('XDEL', KEYS[2], ARGV[1])
if acked == 0 or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_error', ARGV[4], 'deliveries', 0)
redis.call('HDEL', KEYS[1], 'claimed_by', 'claimed_at')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('XADD', KEYS[4], '*', 'items', '[' .. ARGV[5] .. ']')
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

# A Lua function for the scripts that carry the tally to the counters: is stream id `a` after
# stream id `b` (false or nil: nothing yet)? Ids are "<ms>-<seq>"; strings do not compare.
AFTER = """
local function after(a, b)
  if not b then return true end
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) > tonumber(bs)
end
"""
