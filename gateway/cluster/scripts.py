"""The Lua scripts that keep the cluster consistent (docs/cluster.md, "Redis keys").

Every script that appends to the log takes the next offset itself (the
prelude): one sequencer, inside Redis, so offsets are integers, strictly
increasing and the same on every node. Each is run with
``KEYS = [seq, log, ...]`` and ``ARGV = [floor, maxlen, node, ...]``:

* ``floor``: the lowest offset the node accepts next, used only when the
  counter is missing (Redis restarted empty): the larger of the wall clock
  in microseconds and the node's high-water mark plus one, so offsets never
  go backwards after a wipe;
* ``maxlen``: the log is trimmed (``MAXLEN ~``) so that a Redis with
  ``noeviction`` never fills up.
"""

from __future__ import annotations

# The sequencer: ``add(...)`` appends one entry with the next offset as its
# explicit id; ``done()`` stores the counter. Lua numbers are doubles: offsets
# stay below 2^53, and are written with %.0f (tostring would give 1.7e+15).
_PRELUDE = """
local n = redis.call('GET', KEYS[1])
if n then n = tonumber(n) else n = tonumber(ARGV[1]) - 1 end
local added = false
local function add(...)
  n = n + 1
  added = true
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], string.format('%.0f', n) .. '-0', ...)
end
local function done()
  if added then redis.call('SET', KEYS[1], string.format('%.0f', n)) end
end
"""

#: A batch of one node's telemetry, in order, as ONE log entry (kind ``t``,
#: gateway/cluster/wire.py): ARGV[4] is the number of messages k, ARGV[5]
#: their headers, ARGV[6] their data, ARGV[7] the batch's id (unique per
#: node and per batch). The messages take offsets first..first+k-1; the
#: entry's id is the last, and its field ``f`` the first. One XADD per batch:
#: per message, Redis only counts (a Lua ``XADD`` per message cost 30-100 us
#: here). Returns the first.
#:
#: Idempotent: KEYS[3] (a hash, node -> "batch-id first") remembers each
#: node's last batch. A call that timed out after Redis ran it is retried with
#: the same id, and gets the same first offset back without a second entry.
#: A node sends its batches one at a time, in order, so its last is the only
#: one that can come again.
TELEMETRY = (
    _PRELUDE
    + """
local last = redis.call('HGET', KEYS[3], ARGV[3])
if last then
  local sp = string.find(last, ' ', 1, true)
  if sp and string.sub(last, 1, sp - 1) == ARGV[7] then return string.sub(last, sp + 1) end
end
local first = n + 1
n = n + tonumber(ARGV[4]) - 1
add('k', 't', 'n', ARGV[3], 'f', string.format('%.0f', first), 'h', ARGV[5], 'm', ARGV[6])
done()
local f = string.format('%.0f', first)
redis.call('HSET', KEYS[3], ARGV[3], ARGV[7] .. ' ' .. f)
return f
"""
)

#: A device came online on node ARGV[3]: KEYS[3] registry, KEYS[4] owners,
#: KEYS[5] fences. ARGV: 4 device, 5 registry entry (JSON), 6 protocol, 7 ts,
#: 8 reason. Takes the device's next fence (returned): a later offline of an
#: older session, on any node, carries an older fence and changes nothing.
ONLINE = (
    _PRELUDE
    + """
local f = redis.call('HINCRBY', KEYS[5], ARGV[4], 1)
redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
add('k', 'p', 'n', ARGV[3], 'd', ARGV[4], 'p', ARGV[6], 'o', '1', 't', ARGV[7],
    'r', ARGV[8], 'e', ARGV[5])
done()
return f
"""
)

#: The device's session on node ARGV[3] ended. Same keys and ARGV as
#: ``ONLINE``, plus ARGV[9] the fence its online took. Applied only when this
#: node still holds the device with that fence (fencing); returns 1 if applied.
OFFLINE = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[4], ARGV[4]) ~= ARGV[3] then return 0 end
if redis.call('HGET', KEYS[5], ARGV[4]) ~= ARGV[9] then return 0 end
redis.call('HDEL', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
add('k', 'p', 'n', ARGV[3], 'd', ARGV[4], 'p', ARGV[6], 'o', '0', 't', ARGV[7],
    'r', ARGV[8], 'e', ARGV[5])
done()
return 1
"""
)

#: Renew node ARGV[3]'s lease for ARGV[4] ms (Redis's clock, so nodes' clocks
#: do not matter) and declare the devices of every expired node ``node_lost``.
#: The script is atomic and removes the expired node as it reports it: one
#: node, whichever runs first, does it once. ARGV[5]: the node's high-water
#: mark; the counter is raised to it (a node that saw offsets a wiped Redis
#: forgot). Returns {had a lease (1/0), live nodes, devices declared lost}.
LEASE = (
    _PRELUDE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hwm = tonumber(ARGV[5])
if n < hwm then n = hwm; redis.call('SET', KEYS[1], string.format('%.0f', n)) end
local had = redis.call('ZSCORE', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. string.format('%.0f', now))
local lost = 0
if #dead > 0 then
  local gone = {}
  for _, d in ipairs(dead) do
    gone[d] = true
    redis.call('ZREM', KEYS[5], d)
  end
  local owners = redis.call('HGETALL', KEYS[4])
  for i = 1, #owners, 2 do
    local dev, holder = owners[i], owners[i + 1]
    if gone[holder] then
      redis.call('HDEL', KEYS[4], dev)
      local raw = redis.call('HGET', KEYS[3], dev)
      local e = {}
      if raw then e = cjson.decode(raw) end
      e.online = false
      e.reason = 'node_lost'
      e.ts = now
      e.node = holder
      local enc = cjson.encode(e)
      redis.call('HSET', KEYS[3], dev, enc)
      add('k', 'p', 'n', holder, 'x', '1', 'd', dev, 'p', e.protocol or '', 'o', '0',
          't', string.format('%.0f', now), 'r', 'node_lost', 'e', enc)
      lost = lost + 1
    end
  end
  done()
end
local live = redis.call('ZRANGEBYSCORE', KEYS[5], string.format('%.0f', now), '+inf')
local h = 0
if had then h = 1 end
return {h, live, lost}
"""
)

#: A node starts: the devices Redis still says it holds (it was killed and
#: restarted before its lease expired) are offline now, reason ``restart``,
#: for every node. KEYS as ``LEASE`` minus the sorted set; ARGV[3] the node,
#: ARGV[4] now (unix ms). Returns how many.
RESET = (
    _PRELUDE
    + """
local owners = redis.call('HGETALL', KEYS[4])
local count = 0
for i = 1, #owners, 2 do
  local dev, holder = owners[i], owners[i + 1]
  if holder == ARGV[3] then
    redis.call('HDEL', KEYS[4], dev)
    local raw = redis.call('HGET', KEYS[3], dev)
    local e = {}
    if raw then e = cjson.decode(raw) end
    e.online = false
    e.reason = 'restart'
    e.ts = tonumber(ARGV[4])
    e.node = holder
    local enc = cjson.encode(e)
    redis.call('HSET', KEYS[3], dev, enc)
    add('k', 'p', 'n', holder, 'x', '1', 'd', dev, 'p', e.protocol or '', 'o', '0',
        't', ARGV[4], 'r', 'restart', 'e', enc)
    count = count + 1
  end
end
done()
return count
"""
)

#: Labels set over the API on node ARGV[3]: KEYS[3] the labels hash, ARGV[4]
#: the device, ARGV[5] its labels as JSON, or "" for none. "" is kept as a
#: tombstone, not deleted: a Redis wiped clean has no entry at all, and only
#: then do nodes reseed the labels they keep (``HSETNX``); a removal made
#: while a node was down is not undone by it. Appended to the log, so every
#: node applies label changes in one order.
LABELS = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
add('k', 'l', 'n', ARGV[3], 'd', ARGV[4], 'v', ARGV[5])
done()
return 1
"""
)

#: A device deleted over the API on node ARGV[3] (ARGV[4]): KEYS[3] registry,
#: KEYS[4] owners, KEYS[5] labels. Not while a node holds the device (it came
#: online meanwhile: returns 0, nothing changes). Its labels get a tombstone
#: (see ``LABELS``); every node reads the entry and deletes what it keeps.
DELETE = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[4], ARGV[4]) then return 0 end
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[5], ARGV[4], '')
add('k', 'd', 'n', ARGV[3], 'd', ARGV[4])
done()
return 1
"""
)
