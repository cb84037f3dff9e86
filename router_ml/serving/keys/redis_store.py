"""The key store shared by several proxy replicas: Redis, with every check-and-write one Lua script.

Layout under the namespace ``ns`` (default ``router-ml-keys``; every key carries the hash tag
``{ns}`` so a Redis Cluster keeps them in one slot)::

    {ns}:keys            hash: secret hash -> the key's record (JSON)
    {ns}:keynames        hash: key name -> secret hash; key id -> secret hash
    {ns}:teams           hash: team name -> the team's record (JSON)
    {ns}:rl:<id>:t       sorted set: request id -> admitted at (the Redis server's clock)
    {ns}:rl:<id>:n       hash: request id -> tokens (the bound, then the actual usage)
    {ns}:rl:<id>:s       counter: the sum of that hash (what a tpm check reads)
    {ns}:ledger:...      a RedisLedger: the keys' and teams' spend, sessions key:<id> / team:<name>

The rate check (:mod:`~router_ml.serving.keys.window`: a sliding-window log) drops the entries older
than a minute, counts, sums and admits with no other command in between, so replicas racing at a
key's limit never admit more than it together; budgets are the RedisLedger's atomic reservations.
"""

from __future__ import annotations

import json
import time
from typing import Any

from router_ml.decision.ledger.redis import RedisLedger
from router_ml.serving.keys.records import ApiKey, Team, check_name, hash_secret, new_key_id, new_secret
from router_ml.serving.keys.window import RATE_WINDOW_S, RateVerdict

# KEYS: times zset, tokens hash, tokens sum; ARGV: request id, tokens, rpm ('' none), tpm ('' none),
# window s, now ('' = the server's clock) -> {1} admitted, or {0, limit, retry-after s ('' = never)}.
# The sum of the window's tokens is kept as a counter, so an admission costs O(log n + expired),
# not a pass over the window; only a refusal by tpm walks it (for Retry-After).
_ADMIT = """
local now = tonumber(ARGV[6])
if ARGV[6] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local window = tonumber(ARGV[5])
local cutoff = now - window
local function drop(ids)
  for i = 1, #ids, 1000 do
    local part = {unpack(ids, i, math.min(i + 999, #ids))}
    local vals = redis.call('HMGET', KEYS[2], unpack(part))
    local gone = 0
    for j = 1, #vals do if vals[j] then gone = gone + tonumber(vals[j]) end end
    redis.call('HDEL', KEYS[2], unpack(part))
    redis.call('ZREM', KEYS[1], unpack(part))
    if gone ~= 0 then redis.call('INCRBY', KEYS[3], -gone) end
  end
end
drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then drop({ARGV[1]}) end
local n = redis.call('ZCARD', KEYS[1])
local need = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local rpm = tonumber(ARGV[3])
  if n + 1 > rpm then
    local first = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    return {0, 'rpm', string.format('%.3f', math.max(0, tonumber(first[2]) + window - now))}
  end
end
if ARGV[4] ~= '' then
  local tpm = tonumber(ARGV[4])
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + need > tpm then
    if need > tpm then return {0, 'tpm', ''} end
    local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    local freed = 0
    for i = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', KEYS[2], entries[i]) or '0')
      if used - freed + need <= tpm then
        return {0, 'tpm', string.format('%.3f', math.max(0, tonumber(entries[i + 1]) + window - now))}
      end
    end
    return {0, 'tpm', string.format('%.3f', window)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], need)
redis.call('INCRBY', KEYS[3], need)
local ttl = math.ceil(window * 2)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
return {1}
"""

# KEYS: tokens hash, tokens sum; ARGV: request id, tokens ('' = release: the entry leaves)
_SETTLE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('INCRBY', KEYS[2], -tonumber(old))
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) - tonumber(old))
end
return 1
"""

# KEYS: keys hash, names hash; ARGV: secret hash, name, id, record -> 1, or 0 when the name is taken
_CREATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1], ARGV[3], ARGV[1])
return 1
"""


class RedisKeyStore:
    """Keys, teams, their spend (a :class:`RedisLedger` in the same namespace) and rate windows,
    shared by every replica that opens ``url`` with the same ``namespace``."""

    def __init__(self, url: str, namespace: str = "router-ml-keys", timeout_s: float = 5.0) -> None:
        self.ledger = RedisLedger(url, namespace=namespace, timeout_s=timeout_s)
        self.url, self.namespace = url, namespace
        self._r, self._errors = self.ledger._r, self.ledger._errors  # one connection pool
        self._k = f"{{{namespace}}}:"
        self._admit = self._r.register_script(_ADMIT)
        self._settle = self._r.register_script(_SETTLE)
        self._create = self._r.register_script(_CREATE)

    def __repr__(self) -> str:
        return f"RedisKeyStore({self.ledger.url!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> RedisKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ keys and teams
    def create_key(self, name: str, **limits: Any) -> tuple[ApiKey, str]:
        """A new key ``name`` with ``limits`` (:class:`ApiKey` fields); ``(key, secret)``. The
        secret is returned only here."""
        secret = new_secret()
        key = ApiKey(new_key_id(), name, hash_secret(secret), created=time.time(), **limits)
        keys = [self._k + "keys", self._k + "keynames"]
        with self._errors():
            ok = self._create(
                keys=keys, args=[key.secret_hash, key.name, key.id, json.dumps(key.to_record())]
            )
        if not ok:
            raise ValueError(f"a key named {name!r} already exists in {self!r}")
        return key, secret

    def key_by_secret(self, secret: str) -> ApiKey | None:
        """The key whose secret is ``secret`` (revoked ones included), else None: one HGET."""
        with self._errors():
            raw = self._r.hget(self._k + "keys", hash_secret(secret))
        return None if raw is None else ApiKey.from_record(json.loads(raw))

    def get_key(self, name_or_id: str) -> ApiKey:
        with self._errors():
            digest = self._r.hget(self._k + "keynames", name_or_id)
            raw = None if digest is None else self._r.hget(self._k + "keys", digest)
        if raw is None:
            raise ValueError(f"no key named {name_or_id!r} in {self!r}")
        return ApiKey.from_record(json.loads(raw))

    def list_keys(self) -> list[ApiKey]:
        with self._errors():
            raws = self._r.hvals(self._k + "keys")
        return sorted((ApiKey.from_record(json.loads(r)) for r in raws), key=lambda k: k.created)

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke a key (for good: its requests get 401 from then on); the revoked key."""
        key = self.get_key(name_or_id)
        if key.active:
            rec = key.to_record()
            rec["revoked"] = time.time()
            with self._errors():
                self._r.hset(self._k + "keys", key.secret_hash, json.dumps(rec))
        return self.get_key(key.id)

    def set_team(self, team: Team) -> Team:
        with self._errors():
            self._r.hset(self._k + "teams", team.name, json.dumps(team.to_dict()))
        return team

    def team(self, name: str) -> Team | None:
        check_name(name, "team")
        with self._errors():
            raw = self._r.hget(self._k + "teams", name)
        return None if raw is None else Team(**json.loads(raw))

    def list_teams(self) -> list[Team]:
        with self._errors():
            raws = self._r.hvals(self._k + "teams")
        return sorted((Team(**json.loads(r)) for r in raws), key=lambda t: t.name)

    # ------------------------------------------------------------------ rate windows
    def _rl(self, key: ApiKey) -> list[str]:
        return [self._k + f"rl:{key.id}:t", self._k + f"rl:{key.id}:n", self._k + f"rl:{key.id}:s"]

    def admit_rate(self, key: ApiKey, request_id: str, tokens: int, now: float | None = None) -> RateVerdict:
        """Admit one request of ``tokens`` (its token bound) if the key's last minute leaves room
        for it under ``rpm`` and ``tpm``, atomically across replicas (one Lua script)."""
        if key.rpm is None and key.tpm is None:
            return RateVerdict(True)
        args = [
            request_id,
            int(tokens),
            "" if key.rpm is None else key.rpm,
            "" if key.tpm is None else key.tpm,
        ]
        args += [repr(RATE_WINDOW_S), "" if now is None else repr(float(now))]
        with self._errors():
            got = self._admit(keys=self._rl(key), args=args)
        if int(got[0]) == 1:
            return RateVerdict(True)
        return RateVerdict(False, got[1], float(got[2]) if got[2] != "" else None)

    def settle_rate(self, key: ApiKey, request_id: str, tokens: int) -> None:
        """The request's actual tokens replace its bound in the window."""
        if key.rpm is not None or key.tpm is not None:
            with self._errors():
                self._settle(keys=self._rl(key)[1:], args=[request_id, int(tokens)])

    def release_rate(self, key: ApiKey, request_id: str) -> None:
        """A request that reached no backend leaves the window."""
        if key.rpm is not None or key.tpm is not None:
            times, *rest = self._rl(key)
            with self._errors():
                self._settle(keys=rest, args=[request_id, ""])
                self._r.zrem(times, request_id)

    def rate_usage(self, key: ApiKey, now: float | None = None) -> tuple[int, int]:
        """``(requests, tokens)`` of the key in the last minute (``now``: this machine's clock)."""
        now = time.time() if now is None else float(now)
        times, tokens, _ = self._rl(key)
        with self._errors():
            ids = self._r.zrangebyscore(times, f"({now - RATE_WINDOW_S!r}", "+inf")
            vals = self._r.hmget(tokens, ids) if ids else []
        return len(ids), sum(int(v or 0) for v in vals)
