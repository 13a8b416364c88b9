"""Redis Streams pipeline: one stream per pipeline, drained by one consumer group.

Layout (``S`` = ``options.stream``, default ``mailpipe:<pipeline>``):

- ``S``: a stream; each entry holds a job's fields natively (id, job, payload, headers as
  JSON, pipeline, priority, delay, auto_ack) plus ``attempts``, the deliveries an earlier
  copy of the job already had (set when a job is requeued).
- ``S:delayed``: a sorted set of delayed jobs scored by their due time (ms, Redis' clock);
  a Lua script moves due ones into ``S`` atomically, so two consumers never both move one.
- ``S:dead``: a stream of dead letters, the job's fields plus ``reason``, ``dead_at``, and
  ``origin`` (the entry id it had in ``S``).

A delivery's ``attempt`` is ``attempts`` plus the entry's delivery count in the group's
pending list: 1 when XREADGROUP hands it out, incremented by every XAUTOCLAIM (the visibility
timeout) and carried over through ``attempts`` when a nack requeues a fresh copy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from mailpipe.config import PipelineOptions, RedisPipelineOptions
from mailpipe.jobs.base import JOB_NAME, Delivery, Driver, DriverError, Job, PipelineStats

T = TypeVar("T")

_TOKEN_LEN = 16  # random prefix that keeps identical delayed jobs apart in the sorted set
_MOVE_LIMIT = 1000  # due delayed jobs moved per script run, to keep each run short

# Shared by every script. A delayed job is stored as one sorted-set member: a token, then
# each field as a 4-byte big-endian length and its bytes (binary safe, no JSON round trip).
_LUA_PRELUDE = f"local TOKEN_LEN = {_TOKEN_LEN}\n" + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function pack(fields)
  local parts = {}
  for i, v in ipairs(fields) do parts[i] = struct.pack('>I4', #v) .. v end
  return table.concat(parts)
end
local function unpack_fields(blob, pos)
  local out = {}
  while pos <= #blob do
    local n = struct.unpack('>I4', blob, pos)
    out[#out + 1] = string.sub(blob, pos + 4, pos + 3 + n)
    pos = pos + 4 + n
  end
  return out
end
local function xadd(stream, maxlen, fields)
  if maxlen ~= '' then
    return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  return redis.call('XADD', stream, '*', unpack(fields))
end
local function set_field(fields, name, value)
  for i = 1, #fields, 2 do
    if fields[i] == name then fields[i + 1] = value; return fields end
  end
  fields[#fields + 1] = name
  fields[#fields + 1] = value
  return fields
end
"""

# KEYS: delayed. ARGV: delay_ms, token, fields...
_DELAY_LUA = _LUA_PRELUDE + """
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[1]), ARGV[2] .. pack(fields))
return 1
"""

# One receive round trip: move due delayed jobs, reclaim entries idle past the visibility
# timeout (with their delivery counts), then read new entries.
# KEYS: stream, delayed. ARGV: group, consumer, min_idle_ms, count, cursor, maxlen, move_limit.
# Returns {next_cursor, {{id, fields, delivery_count}...}, next_due_ms or -1, now_ms}.
_TAKE_LUA = _LUA_PRELUDE + """
local stream, zset, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local count = tonumber(ARGV[4])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
for _, member in ipairs(due) do
  xadd(stream, ARGV[6], unpack_fields(member, TOKEN_LEN + 1))
  redis.call('ZREM', zset, member)
end
local out = {}
local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], ARGV[5],
                           'COUNT', count)
for _, entry in ipairs(claimed[2]) do
  if entry[2] then
    local info = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
    out[#out + 1] = {entry[1], entry[2], info[1][4]}
  end
end
if #out < count then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #out,
                          'STREAMS', stream, '>')
  if read then
    for _, entry in ipairs(read[1][2]) do out[#out + 1] = {entry[1], entry[2], 1} end
  end
end
local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
local next_due = -1
if first[2] then next_due = first[2] end
return {claimed[1], out, next_due, now}
"""

# Requeue or dead-letter one delivery atomically, only while this consumer still owns it
# (after the visibility timeout another consumer may hold it: a stale nack must not copy it).
# KEYS: stream, delayed, dead. ARGV: group, consumer, id, mode ('requeue'|'dead'),
# attempts, delay_ms, token, maxlen, reason. Returns 1 if done, 0 if no longer ours.
_SETTLE_LUA = _LUA_PRELUDE + """
local stream, zset, dead = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local pending = redis.call('XPENDING', stream, group, id, id, 1)
if #pending == 0 or pending[1][2] ~= consumer then return 0 end
local entry = redis.call('XRANGE', stream, id, id)
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
if #entry == 0 then return 0 end
local fields = set_field(entry[1][2], 'attempts', ARGV[5])
if ARGV[4] == 'dead' then
  set_field(fields, 'reason', ARGV[9])
  set_field(fields, 'dead_at', tostring(now_ms()))
  set_field(fields, 'origin', id)
  redis.call('XADD', dead, '*', unpack(fields))
elseif tonumber(ARGV[6]) > 0 then
  redis.call('ZADD', zset, now_ms() + tonumber(ARGV[6]), ARGV[7] .. pack(fields))
else
  xadd(stream, ARGV[8], fields)
end
return 1
"""

# Delete the waiting jobs: entries the group has not delivered yet, and delayed ones.
# Reserved entries stay: their consumers will ack them. KEYS: stream, delayed. ARGV: group.
_PURGE_LUA = """
local stream, zset, group = KEYS[1], KEYS[2], ARGV[1]
local removed = redis.call('ZCARD', zset)
redis.call('DEL', zset)
if redis.call('EXISTS', stream) == 0 then return removed end
local last = '0-0'
for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if fields['name'] == group then last = fields['last-delivered-id'] end
end
while true do
  local batch = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1000)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do redis.call('XDEL', stream, entry[1]) end
  removed = removed + #batch
  last = batch[#batch][1]
end
return removed
"""

# Forget this consumer on close unless it still holds entries (deleting a consumer drops its
# pending entries, which would then never be reclaimed). KEYS: stream. ARGV: group, consumer.
_FORGET_LUA = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #held > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# Drop consumers that hold nothing and were not seen for ARGV[2] ms: processes that died
# after their entries were reclaimed. Harmless if one was alive: XREADGROUP recreates it.
# KEYS: stream. ARGV: group, idle_ms.
_PRUNE_LUA = """
local removed = 0
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) then
    removed = removed + redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
  end
end
return removed
"""
_PRUNE_IDLE_MS = 3_600_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field_map(fields: Any) -> dict[bytes, bytes]:
    """Entry fields as a dict, whether redis-py parsed them (dict) or Lua returned a list."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


class RedisDriver(Driver):
    name = "redis"
    connect_timeout = 2.0  # a broker that does not answer the TCP handshake this fast is down
    command_timeout = 5.0  # longest wait for any reply (plus the block time of a blocking read)

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        if not isinstance(options, RedisPipelineOptions):
            options = RedisPipelineOptions.model_validate(options.model_dump())
        super().__init__(pipeline, options, data_dir=data_dir)
        self.opts = options
        self.stream = options.stream or f"mailpipe:{pipeline}"
        self.delayed_key = f"{self.stream}:delayed"
        self.dead_key = f"{self.stream}:dead"
        self.group = options.group
        # Unique per instance: two drivers in one process are two consumers, and a restarted
        # process must not inherit (and so never reclaim) its predecessor's pending entries.
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._client: Redis | None = None
        self._declared = False
        self._cursor: bytes | str = "0-0"  # XAUTOCLAIM scan position, resumed across calls
        self._last_error: str | None = None

    # ---- connection ---------------------------------------------------------------------

    def _make_client(self) -> Redis:
        # No retries inside redis-py: a command that failed may have run (XADD), so the
        # caller decides; a dead idle connection is still replaced when taken from the pool.
        client = Redis.from_url(
            self.opts.addr,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.command_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=self.consumer,
        )
        self._delay_script = client.register_script(_DELAY_LUA)
        self._take_script = client.register_script(_TAKE_LUA)
        self._settle_script = client.register_script(_SETTLE_LUA)
        self._purge_script = client.register_script(_PURGE_LUA)
        self._forget_script = client.register_script(_FORGET_LUA)
        self._prune_script = client.register_script(_PRUNE_LUA)
        self._client = client
        return client

    async def _declare(self, client: Redis) -> None:
        try:
            await client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._prune_script(keys=[self.stream], args=[self.group, _PRUNE_IDLE_MS],
                                 client=client)
        self._declared = True

    async def _run(self, what: str, op: Callable[[Redis], Awaitable[T]],
                   extra_time: float = 0.0) -> T:
        """One operation against Redis, bounded in time, with failures as DriverError."""
        client = self._client or self._make_client()
        try:
            async with asyncio.timeout(self.connect_timeout + self.command_timeout + extra_time):
                if not self._declared:
                    await self._declare(client)
                try:
                    result = await op(client)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream or group was deleted under us (FLUSHDB, a manual DEL).
                    await self._declare(client)
                    result = await op(client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise DriverError(f"redis {what} on {self.stream}: {self._last_error}") from exc
        self._last_error = None
        return result

    async def connect(self) -> None:
        if not self._declared:
            await self._run("connect", self._declare)

    async def close(self) -> None:
        client, self._client, self._declared = self._client, None, False
        if client is None:
            return
        try:
            async with asyncio.timeout(self.command_timeout):
                await self._forget_script(keys=[self.stream], args=[self.group, self.consumer],
                                          client=client)
        except (RedisError, OSError, TimeoutError):
            pass  # best effort: an unforgotten consumer only lingers in XINFO CONSUMERS
        await client.aclose()

    def health(self) -> dict[str, Any]:
        return {"ok": self._last_error is None, "driver": self.name, "stream": self.stream,
                "consumer": self.consumer, "error": self._last_error}

    # ---- producing ----------------------------------------------------------------------

    def _fields(self, job: Job) -> list[bytes | str]:
        return [
            "id", job.id, "job", job.name, "payload", job.payload,
            "headers", orjson.dumps(job.headers), "pipeline", job.pipeline or self.pipeline,
            "priority", str(job.priority), "delay", repr(float(job.delay)),
            "auto_ack", "1" if job.auto_ack else "0",
        ]

    async def push_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return

        async def push(client: Redis) -> None:
            # MULTI/EXEC: the whole batch is stored or none of it, in one round trip; the
            # EXEC reply (every XADD's id) is the confirmation.
            async with client.pipeline(transaction=True) as pipe:
                for job in jobs:
                    fields = self._fields(job)
                    if job.delay > 0:
                        args = [int(job.delay * 1000), secrets.token_hex(_TOKEN_LEN // 2)]
                        # Queued, not run: awaiting a pipelined call only adds it.
                        await self._delay_script(keys=[self.delayed_key], args=args + fields,
                                                 client=pipe)
                    else:
                        pipe.xadd(self.stream, dict(zip(fields[::2], fields[1::2], strict=True)),
                                  maxlen=self.opts.maxlen, approximate=True)
                await pipe.execute()

        await self._run("push", push)

    # ---- consuming ----------------------------------------------------------------------

    @property
    def _poll(self) -> float:
        """Longest blocking read: how late a reclaim or another node's due job may be seen."""
        return min(0.5, max(0.05, self.opts.visibility_timeout / 4))

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            deliveries, wait = await self._take(max_items)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            deliveries = await self._read_blocking(max_items, min(remaining, wait))
            if deliveries or loop.time() >= deadline:
                return deliveries

    async def _take(self, max_items: int) -> tuple[list[Delivery], float]:
        """Deliveries available now, and how long to block before looking again."""
        args = [self.group, self.consumer, int(self.opts.visibility_timeout * 1000),
                max_items, self._cursor, self.opts.maxlen or "", _MOVE_LIMIT]

        async def take(client: Redis) -> Any:
            return await self._take_script(keys=[self.stream, self.delayed_key], args=args,
                                           client=client)

        cursor, entries, next_due, now = await self._run("receive", take)
        self._cursor = cursor
        wait = self._poll
        if float(next_due) >= 0:
            wait = min(wait, max(0.001, (float(next_due) - now) / 1000))
        return [self._delivery(e[0], _field_map(e[1]), int(e[2])) for e in entries], wait

    async def _read_blocking(self, max_items: int, wait: float) -> list[Delivery]:
        block_ms = max(1, int(wait * 1000))  # never 0: BLOCK 0 waits forever

        async def read(client: Redis) -> Any:
            return await client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                           count=max_items, block=block_ms)

        reply = await self._run("receive", read, extra_time=wait)
        return [self._delivery(entry_id, _field_map(fields), 1)
                for _, entries in reply or [] for entry_id, fields in entries]

    def _delivery(self, entry_id: Any, fields: dict[bytes, bytes], count: int) -> Delivery:
        def get(name: str, default: str = "") -> str:
            value = fields.get(name.encode())
            return default if value is None else value.decode()

        job = Job(
            id=get("id") or _text(entry_id),
            payload=fields.get(b"payload", b""),
            name=get("job", JOB_NAME),
            headers=orjson.loads(fields.get(b"headers") or b"{}"),
            pipeline=get("pipeline") or self.pipeline,
            priority=int(get("priority", "10")),
            delay=float(get("delay", "0")),
            auto_ack=get("auto_ack") == "1",
        )
        attempt = int(get("attempts", "0")) + count
        return Delivery(job=job, attempt=attempt, ref=_text(entry_id), queue=self.stream)

    async def ack(self, delivery: Delivery) -> None:
        async def ack(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, delivery.ref)
                pipe.xdel(self.stream, delivery.ref)
                await pipe.execute()

        await self._run("ack", ack)

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        if not requeue:
            await self.dead_letter(delivery, "nacked without requeue")
            return
        await self._settle(delivery, "requeue", delay=delay)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._settle(delivery, "dead", reason=reason)

    async def _settle(self, delivery: Delivery, mode: str, *, delay: float = 0.0,
                      reason: str = "") -> None:
        args = [self.group, self.consumer, delivery.ref, mode, delivery.attempt,
                int(max(0.0, delay) * 1000), secrets.token_hex(_TOKEN_LEN // 2),
                self.opts.maxlen or "", reason]

        async def settle(client: Redis) -> Any:
            return await self._settle_script(
                keys=[self.stream, self.delayed_key, self.dead_key], args=args, client=client)

        await self._run(mode, settle)

    # ---- administration -----------------------------------------------------------------

    async def stats(self) -> PipelineStats:
        async def query(client: Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xpending(self.stream, self.group)
                pipe.xlen(self.stream)
                pipe.zcard(self.delayed_key)
                pipe.xlen(self.dead_key)
                return await pipe.execute()

        pending, length, delayed, dead = await self._run("stats", query)
        reserved = int(pending["pending"])
        return PipelineStats(
            pipeline=self.pipeline, driver=self.name, queue=self.stream,
            # Acked entries are deleted, so what the stream holds is either ready or reserved.
            ready=max(0, int(length) - reserved), delayed=int(delayed), reserved=reserved,
            dead=int(dead),
            extra={"group": self.group, "length": int(length),
                   "consumers_holding": len(pending.get("consumers") or [])},
        )

    async def purge(self) -> int:
        async def purge(client: Redis) -> Any:
            return await self._purge_script(keys=[self.stream, self.delayed_key],
                                            args=[self.group], client=client)

        return int(await self._run("purge", purge))
