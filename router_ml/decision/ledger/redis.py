"""The spend ledger in Redis, shared by several proxy replicas (the :class:`BudgetLedger` interface).

Layout under one namespace ``ns`` (every key carries the hash tag ``{ns}``, so a Redis Cluster keeps
them in one slot and the Lua scripts may touch them all)::

    {ns}:ledger:schema       hash: app, version (a namespace holding anything else is refused)
    {ns}:ledger:seq          counter: insertion order (ties in ts keep it, as BudgetLedger's rowid)
    {ns}:ledger:r:<id>       hash per record: ts, model, nano, seq[, session][, meta][, backend]
    {ns}:ledger:ts           sorted set of every record by ts; member "<seq:016d>|<nano>|<id>"
    {ns}:ledger:s:<session>  the same, per session
    {ns}:ledger:totals       hash: "n"/"c" (count, nano-dollars of all), "n:<s>"/"c:<s>" per session
    {ns}:ledger:hours        hash: per UTC hour "<hour start>" and "<hour start>:<s>" -> nano-dollars,
                             "max" -> the latest hour (what ``reserve`` sums over a budget period)
    {ns}:ledger:res          hash: request id -> "<nano>|<expires>|<has session>|<session>" (holds)
    {ns}:ledger:resexp       sorted set of the held request ids by expiry (unix s, server clock)

Money is stored as **integer nano-dollars** (1e-9 $; a call is rounded to the nearest one when
recorded), summed as integers: totals are exact and order-independent (exact up to $9M in a
window sum, int64 in the running totals). Nano rather than micro because a call to a small local
model costs well under a micro-dollar. ``entries()`` reports ``nano / 1e9``, so
``spent() == fsum(entries().cost_usd)`` for any cost with at most 9 decimals.

``record`` is one Lua script: the existence check of ``r:<id>`` and every write happen atomically,
so concurrent replicas recording the same ``request_id`` count it once; it also settles the
request's reservation. ``reserve`` is one Lua script too: lapsed holds are dropped, then spend in
the window (the hour totals from the period's start: O(hours), not O(records)) + every hold +
the new amount is checked against the cap and the hold written, with no
other command in between, so replicas racing at the cap never hold more than it together. Holds
lapse on the Redis server's clock (``TIME``), so replicas with skewed clocks agree. ``spent``/``count``
without a window read the running totals (O(1)); with ``since``/``until`` they sum the members of
the window inside Redis (O(log n + k)). Durability is the server's: run it with
``appendonly yes`` (``appendfsync everysec`` loses at most ~1 s of records on power loss; a killed
redis-server loses nothing it acknowledged).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pandas as pd

from router_ml.decision.ledger.records import (
    RESERVATION_TTL_S,
    LedgerError,
    _check_record,
    _check_reservation,
    _entries_frame,
)

SCHEMA_VERSION = 2  # 2: hour totals (a version-1 namespace gains them when opened)
APP = "router-ml-ledger"
NANO = 1_000_000_000

# KEYS: record hash, all zset, session zset, totals, seq, holds hash, holds expiry zset, hours
# ARGV: id, ts, nano, model, has_session, session, has_meta, meta, token, backend ('' for none)
_RECORD = """
redis.call('HDEL', KEYS[6], ARGV[1])  -- settle the request's reservation
redis.call('ZREM', KEYS[7], ARGV[1])
local old = redis.call('HGET', KEYS[1], 'tok')
if old then
  if old == ARGV[9] then return 1 end  -- our own write, retried after a lost reply
  return 0
end
local seq = redis.call('INCR', KEYS[5])
local member = string.format('%016d', seq) .. '|' .. ARGV[3] .. '|' .. ARGV[1]
redis.call('HSET', KEYS[1], 'ts', ARGV[2], 'model', ARGV[4], 'nano', ARGV[3], 'seq', seq, 'tok', ARGV[9])
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'meta', ARGV[8]) end
if ARGV[10] and ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'backend', ARGV[10]) end
redis.call('ZADD', KEYS[2], ARGV[2], member)
local hour = string.format('%d', math.floor(tonumber(ARGV[2]) / 3600) * 3600)
redis.call('HINCRBY', KEYS[8], hour, ARGV[3])
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[8], hour .. ':' .. ARGV[6], ARGV[3]) end
local top = redis.call('HGET', KEYS[8], 'max')
if (not top) or tonumber(hour) > tonumber(top) then redis.call('HSET', KEYS[8], 'max', hour) end
redis.call('HINCRBY', KEYS[4], 'n', 1)
redis.call('HINCRBY', KEYS[4], 'c', ARGV[3])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'session', ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[2], member)
  redis.call('HINCRBY', KEYS[4], 'n:' .. ARGV[6], 1)
  redis.call('HINCRBY', KEYS[4], 'c:' .. ARGV[6], ARGV[3])
end
return 1
"""

# KEYS: window zset, totals, holds hash, holds expiry zset, hours
# ARGV: id, nano, ttl_s, now ('' = the server's clock), since ('' = no window), cap nano,
#       has_session, session, since as a whole hour ('' = not on an hour) -> 1 (held) or 0 (refused)
_RESERVE = """
local now = tonumber(ARGV[4])
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for i = 1, #lapsed do redis.call('HDEL', KEYS[3], lapsed[i]) end
if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local spent = 0
if ARGV[5] == '' then
  local field = 'c'
  if ARGV[7] == '1' then field = 'c:' .. ARGV[8] end
  spent = tonumber(redis.call('HGET', KEYS[2], field) or '0')
else
  local top = tonumber(redis.call('HGET', KEYS[5], 'max') or '')
  local first = tonumber(ARGV[9])
  if first and (not top or (top - first) / 3600 < 20000) then  -- sum the hour totals
    local suffix = ''
    if ARGV[7] == '1' then suffix = ':' .. ARGV[8] end
    local h = first
    while top and h <= top do
      local fields = {}
      while h <= top and #fields < 500 do
        fields[#fields + 1] = string.format('%d', h) .. suffix
        h = h + 3600
      end
      local vals = redis.call('HMGET', KEYS[5], unpack(fields))
      for i = 1, #vals do if vals[i] then spent = spent + tonumber(vals[i]) end end
    end
  else  -- a window not on an hour: sum its records
    local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[5], '+inf')
    for i = 1, #members do
      spent = spent + tonumber(string.match(members[i], '^%d+|(%d+)|'))
    end
  end
end
local held = 0
local holds = redis.call('HVALS', KEYS[3])
for i = 1, #holds do
  local nano, _, has, sess = string.match(holds[i], '^(%d+)|([^|]*)|(%d)|(.*)$')
  if ARGV[7] ~= '1' or (has == '1' and sess == ARGV[8]) then held = held + tonumber(nano) end
end
if spent + held + tonumber(ARGV[2]) > tonumber(ARGV[6]) then return 0 end
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. '|' .. string.format('%.6f', expires) .. '|' .. ARGV[7] .. '|' .. ARGV[8])
redis.call('ZADD', KEYS[4], expires, ARGV[1])
return 1
"""

# KEYS: zset; ARGV: min, max -> {count, nano as a decimal string}
_WINDOW = """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2])
local total = 0
for i = 1, #members do
  total = total + tonumber(string.match(members[i], '^%d+|(%d+)|'))
end
return {#members, string.format('%.0f', total)}
"""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user-info and ``password=`` query)."""
    url = re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


def _bound(value: float | None, default: str, exclusive: bool) -> str:
    if value is None:
        return default
    x = float(value)
    if math.isnan(x):
        raise ValueError("a ledger window bound must be a number or None, got NaN")
    return ("(" if exclusive else "") + repr(x)


class RedisLedger:
    """Append-only spend records in Redis, exact and idempotent across replicas and restarts.

    Parameters
    ----------
    url : a redis-py URL (``redis://[:password@]host:port/db``, ``rediss://``, ``unix://``).
    namespace : the key prefix; replicas that share a budget share a namespace.
    timeout_s : connect and per-command socket timeout.
    """

    def __init__(self, url: str, namespace: str = "router-ml", timeout_s: float = 5.0) -> None:
        try:
            import redis
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise LedgerError("RedisLedger needs the redis client: pip install redis") from err
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        if not isinstance(namespace, str) or not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be a non-empty string without braces, got {namespace!r}")
        self.url, self.namespace, self.timeout_s = str(url), namespace, float(timeout_s)
        self._closed = False
        try:
            self._r = redis.Redis.from_url(
                self.url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
                decode_responses=True,
            )
        except ValueError as err:
            raise LedgerError(f"redis ledger {redact_url(self.url)!r}: bad URL: {err}") from err
        self._k = f"{{{namespace}}}:ledger:"
        self._record = self._r.register_script(_RECORD)
        self._window = self._r.register_script(_WINDOW)
        self._reserve = self._r.register_script(_RESERVE)
        self._init_schema()

    def __reduce__(self) -> tuple[Any, ...]:  # a spawned worker reconnects from the arguments
        return (type(self), (self.url, self.namespace, self.timeout_s))

    def __repr__(self) -> str:
        return f"RedisLedger({redact_url(self.url)!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ connection and schema
    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis failures -> :class:`LedgerError` naming the (redacted) URL."""
        import redis

        if self._closed:
            raise LedgerError(f"redis ledger {redact_url(self.url)!r} is closed")
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            raise LedgerError(
                f"redis ledger {redact_url(self.url)!r} cannot be reached: {type(err).__name__}: {err}"
            ) from err
        except redis.exceptions.RedisError as err:
            raise LedgerError(
                f"redis ledger {redact_url(self.url)!r} (namespace {self.namespace!r}) failed: {err}"
            ) from err

    def _init_schema(self) -> None:
        key = self._k + "schema"
        with self._errors():
            pipe = self._r.pipeline(transaction=True)
            pipe.hsetnx(key, "app", APP).hsetnx(key, "version", SCHEMA_VERSION).hgetall(key)
            found = pipe.execute()[-1]
        problem = None
        if found.get("app") != APP:
            problem = f"key {key!r} does not mark a router-ml spend ledger ({found})"
        elif int(found.get("version", 0)) > SCHEMA_VERSION:
            problem = f"schema version {found['version']} is newer than this code's {SCHEMA_VERSION}"
        if problem:
            self.close()
            raise LedgerError(f"redis ledger {redact_url(self.url)!r} cannot be used: {problem}")
        if int(found.get("version", 0)) < SCHEMA_VERSION:
            self._add_hour_totals()

    def _add_hour_totals(self) -> None:
        """Upgrade a version-1 namespace: hour totals from its records (replicas must be stopped)."""
        hours: dict[str, int] = {}
        with self._errors():
            for zkey in self._r.scan_iter(match=self._k + "s:*"):
                session = zkey[len(self._k) + 2 :]
                for member, ts in self._r.zrange(zkey, 0, -1, withscores=True):
                    key = f"{math.floor(ts / 3600) * 3600}:{session}"
                    hours[key] = hours.get(key, 0) + int(member.split("|")[1])
            for member, ts in self._r.zrange(self._zset(None), 0, -1, withscores=True):
                key = str(math.floor(ts / 3600) * 3600)
                hours[key] = hours.get(key, 0) + int(member.split("|")[1])
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(self._k + "hours")
            if hours:
                pipe.hset(self._k + "hours", mapping=hours)
                top = max(int(k.split(":")[0]) for k in hours)
                pipe.hset(self._k + "hours", "max", str(top))
            pipe.hset(self._k + "schema", "version", SCHEMA_VERSION)
            pipe.execute()

    def _zset(self, session: str | None) -> str:
        return self._k + ("ts" if session is None else f"s:{session}")

    def close(self) -> None:
        """Drop this process's connections; the ledger cannot be used afterwards."""
        if not self._closed:
            self._r.close()
        self._closed = True

    def __enter__(self) -> RedisLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writes and reads
    def record(
        self,
        cost_usd: float,
        model: str,
        request_id: str | None = None,
        ts: float | None = None,
        session: str | None = None,
        meta: Mapping | None = None,
        backend: str | None = None,
    ) -> bool:
        """Record one call's spend; ``False`` (and nothing changes) when ``request_id`` is already in.
        ``model``: the model decided on; ``backend``: the catalog backend that served it."""
        rid, when, model, cost, session, meta_json, backend = _check_record(
            cost_usd, model, request_id, ts, session, meta, backend
        )
        nano = round(cost * NANO)
        keys = [self._k + f"r:{rid}", self._zset(None), self._zset(session), self._k + "totals"]
        args = [rid, repr(when), str(nano), model, int(session is not None), session or ""]
        args += [int(meta_json is not None), meta_json or "", uuid.uuid4().hex, backend or ""]
        with self._errors():
            return bool(
                self._record(keys=[*keys, self._k + "seq", *self._holds(), self._k + "hours"], args=args)
            )

    def _holds(self) -> list[str]:
        return [self._k + "res", self._k + "resexp"]

    def _totals(self, since: float | None, until: float | None, session: str | None) -> tuple[int, int]:
        lo, hi = _bound(since, "-inf", False), _bound(until, "+inf", True)
        with self._errors():
            if since is None and until is None:
                suffix = "" if session is None else f":{session}"
                n, c = self._r.hmget(self._k + "totals", "n" + suffix, "c" + suffix)
                return int(n or 0), int(c or 0)
            n, c = self._window(keys=[self._zset(session)], args=[lo, hi])
        return int(n), int(c)

    def spent(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> float:
        """Total $ recorded with ``since <= ts < until`` (open ends when ``None``) in ``session``."""
        return self._totals(since, until, session)[1] / NANO

    def count(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> int:
        """Number of records in the window (same filters as :meth:`spent`)."""
        if since is None and until is None:
            return self._totals(None, None, session)[0]
        lo, hi = _bound(since, "-inf", False), _bound(until, "+inf", True)
        with self._errors():
            return int(self._r.zcount(self._zset(session), lo, hi))

    def entries(
        self, since: float | None = None, until: float | None = None, session: str | None = None
    ) -> pd.DataFrame:
        """The records in the window, oldest first (ties in insertion order): columns ``request_id,
        ts, model, cost_usd, session, meta, backend`` as :meth:`BudgetLedger.entries`."""
        lo, hi = _bound(since, "-inf", False), _bound(until, "+inf", True)
        rows: list[tuple] = []
        with self._errors():
            ids = [m.split("|", 2)[2] for m in self._r.zrangebyscore(self._zset(session), lo, hi)]
            for start in range(0, len(ids), 1000):
                pipe = self._r.pipeline(transaction=False)
                for rid in ids[start : start + 1000]:
                    pipe.hgetall(self._k + f"r:{rid}")
                for rid, h in zip(ids[start : start + 1000], pipe.execute(), strict=True):
                    row = (rid, float(h["ts"]), h["model"], int(h["nano"]) / NANO)
                    rows.append((*row, h.get("session"), h.get("meta"), h.get("backend")))
        return _entries_frame(rows)

    # ------------------------------------------------------------------ reservations
    def reserve(
        self,
        request_id: str,
        amount_usd: float,
        cap_usd: float,
        since: float | None = None,
        session: str | None = None,
        ttl_s: float = RESERVATION_TTL_S,
        now: float | None = None,
    ) -> bool:
        """Hold ``amount_usd`` for ``request_id`` if ``spent(since, session) + outstanding
        reservations + amount <= cap_usd``, atomically across replicas (one Lua script); ``False``
        (nothing held) otherwise. The hold lapses ``ttl_s`` after ``now`` (default: the Redis
        server's clock); :meth:`record` settles it, :meth:`release` drops it."""
        rid, amount, cap, ttl = _check_reservation(request_id, amount_usd, cap_usd, ttl_s, session)
        keys = [self._zset(session), self._k + "totals", *self._holds(), self._k + "hours"]
        args = [rid, str(math.ceil(amount * NANO)), repr(ttl), "" if now is None else repr(float(now))]
        args += ["" if since is None else _bound(since, "-inf", False), str(math.floor(cap * NANO))]
        args += [int(session is not None), session or ""]
        aligned = since is not None and math.isfinite(since) and float(since) % 3600 == 0
        args.append(str(int(since)) if aligned else "")
        with self._errors():
            return bool(self._reserve(keys=keys, args=args))

    def release(self, request_id: str) -> bool:
        """Drop ``request_id``'s reservation (its call failed); ``False`` when it held none."""
        with self._errors():
            pipe = self._r.pipeline(transaction=True)
            pipe.hdel(self._k + "res", str(request_id)).zrem(self._k + "resexp", str(request_id))
            return bool(pipe.execute()[0])

    def reserved(self, session: str | None = None, now: float | None = None) -> float:
        """$ held by reservations that have not lapsed (``session`` None: all); ``now`` default:
        this machine's clock."""
        now = time.time() if now is None else float(now)
        with self._errors():
            holds = self._r.hvals(self._k + "res")
        total = 0
        for h in holds:
            nano, expires, has, sess = h.split("|", 3)
            if float(expires) > now and (session is None or (has == "1" and sess == session)):
                total += int(nano)
        return total / NANO
