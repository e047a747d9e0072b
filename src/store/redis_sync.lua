-- One replica's sync of one shared budget period, atomically (see src/store/redis.rs).
--
-- KEYS[1] spent  hash   settled usage of all replicas: tokens, micro_usd, requests, ...
-- KEYS[2] lease  hash   t:<replica> / u:<replica> -> that replica's outstanding lease
-- KEYS[3] beat   zset   replica -> when its lease expires (ms, Redis clock)
-- KEYS[4] seq    hash   replica -> the last batch added to `spent`
--
-- ARGV[1]      replica id
-- ARGV[2]      batch number (0: nothing to add)
-- ARGV[3..9]   the batch: tokens, micro_usd, requests, input_tokens, cached_input_tokens,
--              output_tokens, reasoning_tokens
-- ARGV[10,11]  the replica's lease after the batch (tokens, micro_usd), absolute
-- ARGV[12,13]  its unused headroom now
-- ARGV[14,15]  the largest estimate it refused since the last sync
-- ARGV[16,17]  the budget's limits (-1: not limited, or no grant wanted)
-- ARGV[18,19]  the smallest slice
-- ARGV[20]     lease time to live, ms
-- ARGV[21]     when the keys expire (Unix seconds; 0: never)
-- ARGV[22]     1: the replica leaves (its lease is dropped)
--
-- Returns {grant_t, grant_u, give_back_t, give_back_u, spent_t, spent_u, leased_t, leased_u,
-- live replicas, free_t, free_u}.
local me = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- A replica that stopped syncing for a lease's lifetime is gone: its lease returns to the pool.
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, replica in ipairs(dead) do
  if replica ~= me then
    redis.call('HDEL', KEYS[2], 't:' .. replica, 'u:' .. replica)
    redis.call('ZREM', KEYS[3], replica)
  end
end

-- Add the batch once: a replay of a batch whose answer was lost finds its number seen.
local seq = tonumber(ARGV[2])
if seq > 0 and seq > tonumber(redis.call('HGET', KEYS[4], me) or '0') then
  local fields = {'tokens', 'micro_usd', 'requests', 'input_tokens', 'cached_input_tokens',
    'output_tokens', 'reasoning_tokens'}
  for i, field in ipairs(fields) do
    if ARGV[2 + i] ~= '0' then
      redis.call('HINCRBY', KEYS[1], field, ARGV[2 + i])
    end
  end
  redis.call('HSET', KEYS[4], me, seq)
end

-- The lease is written whole, not added to: a grant whose answer was lost is undone here.
local leave = ARGV[22] == '1'
if leave then
  redis.call('HDEL', KEYS[2], 't:' .. me, 'u:' .. me)
  redis.call('ZREM', KEYS[3], me)
else
  redis.call('HSET', KEYS[2], 't:' .. me, ARGV[10], 'u:' .. me, ARGV[11])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[20]), me)
end

local leased = {t = 0, u = 0}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local amount = tonumber(flat[i + 1])
  if amount > 0 then
    local kind = string.sub(flat[i], 1, 1)
    leased[kind] = leased[kind] + amount
  end
end
local spent_t = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local spent_u = tonumber(redis.call('HGET', KEYS[1], 'micro_usd') or '0')
local live = math.max(1, redis.call('ZCARD', KEYS[3]))

-- The slice policy: aim = max(smallest slice, largest refused estimate, free / (2 x live
-- replicas)), so slices shrink as the budget runs out. Top up to the aim when the headroom is
-- under half of it (or a refused estimate did not fit); give back what is beyond twice the aim,
-- and whatever is leased past the limit.
local function share(kind, spent, limit, have, need, smallest)
  if limit < 0 or leave then
    return 0, 0, 0
  end
  local free = limit - spent - leased[kind]
  if free < 0 then
    return 0, math.min(math.max(have, 0), -free), free
  end
  local aim = math.max(smallest, need, math.floor(free / (2 * live)))
  if have * 2 < aim or need > have then
    local grant = math.min(free, aim - math.max(have, 0))
    if grant > 0 then
      redis.call('HINCRBY', KEYS[2], kind .. ':' .. me, grant)
      leased[kind] = leased[kind] + grant
      return grant, 0, free - grant
    end
    return 0, 0, free
  end
  if have > 2 * aim then
    return 0, have - aim, free
  end
  return 0, 0, free
end

local grant_t, back_t, free_t = share('t', spent_t, tonumber(ARGV[16]), tonumber(ARGV[12]),
  tonumber(ARGV[14]), tonumber(ARGV[18]))
local grant_u, back_u, free_u = share('u', spent_u, tonumber(ARGV[17]), tonumber(ARGV[13]),
  tonumber(ARGV[15]), tonumber(ARGV[19]))

local expire_at = tonumber(ARGV[21])
if expire_at > 0 then
  for i = 1, 4 do
    redis.call('EXPIREAT', KEYS[i], expire_at)
  end
else
  -- A total budget never ends; forget the batch numbers of replicas silent for a week.
  redis.call('EXPIRE', KEYS[4], 604800)
end

return {grant_t, grant_u, back_t, back_u, spent_t, spent_u, leased.t, leased.u, live, free_t,
  free_u}
