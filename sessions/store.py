"""The Redis store for conversations, turns and their delta logs.

Several server processes share one Redis, so every decision that must be
atomic (accepting a turn, ending it, clearing a conversation) is one Lua
script. Scripts only touch keys passed in ``KEYS`` and all of them share the
user's hash tag (see :mod:`sessions.keys`), so they also run on Redis Cluster.
On a cluster (a ``redis.asyncio.cluster.RedisCluster`` client) the store
differs in two places only, both through :mod:`sessions.cluster`: scripts
batched for many turns (:meth:`ConversationStore.append_deltas_many`) run
concurrently, since redis-py's cluster pipeline refuses ``EVALSHA``; and
:meth:`ConversationStore.delete_user` scans only the node holding the user's
slot. Pipelines of plain commands (:meth:`ConversationStore.history_with`, whose
``also`` commands may name the deployment-level lease index, in another slot)
stay pipelines: redis-py's cluster pipeline is non-transactional and sends each
node its share of the commands, in parallel.
When a script needs a key that is named by data (the record of the turn an
idempotency key or the ``active`` hash points at), the caller passes the key it
expects together with the value it expects; the script re-checks that value and
answers ``retry`` with the current values when they changed in between.

Every connection-level failure (refused, timed out, loading, cluster down,
read-only replica after a failover) is raised as :class:`protocol.errors.Unavailable`.

Blocking reads (:meth:`ConversationStore.follow_log`) hold a connection for up
to ``block_ms``: give the store a dedicated ``blocking_redis`` client (its own
pool, ``socket_timeout`` larger than any ``block_ms`` used, or ``None``) so
blocked readers never starve the pool used for ordinary commands.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc

from protocol.errors import BadRequest, NotFound, RapportError, TurnInProgress, Unavailable
from sessions.cluster import ScriptCall, run_scripts, scan_slot_of
from sessions.keys import KeySpace

log = logging.getLogger("rapport.store")

__all__ = [
    "BeginOutcome",
    "ConversationStore",
    "HistoryMessage",
    "LogDelta",
    "LogEnd",
    "RETRY_AFTER_MS",
    "TurnRecord",
    "storage_unavailable",
]

# ---------------------------------------------------------------------------
# Lua scripts
# ---------------------------------------------------------------------------

# begin_turn: accept a new turn, or answer replayed / in_progress, atomically.
# KEYS: 1 idempotency key, 2 new turn record, 3 active hash, 4 history stream,
#       5 conversations zset, 6 record of the turn ARGV[1] names (replay),
#       7 record of the turn ARGV[2] names (running), 8 conversation meta hash.
#       6 and 7 are placeholders (never read) when ARGV[1] / ARGV[2] are empty.
# ARGV: 1 expected idempotency value or "", 2 expected active value or "",
#       3 conversation_id, 4 turn_id, 5 user_id, 6 client_turn_id, 7 text,
#       8 owner, 9 now_ms, 10 idempotency ttl (s), 11 history max messages,
#       12 mode ("new" | "regenerate" | "edit"), 13 the exchange regenerate and
#       edit name, 14 character_id to bind or check ("" none), 15 greeting to
#       store when the binding is made ("" none), 16 most alternatives per exchange.
# The meta hash counts the conversation's turns ("turns": user messages, and a
# greeting) so that the prompt window can trim by absolute position.
# Returns {"replayed", turn_id, record-as-flat-list} | {"in_progress", turn_id}
#       | {"accepted", alternative index} | {"retry", current idempotency value, current active value}
#       | {"bound", bound character} | {"not_empty"} | {"not_newest", newest exchange or ""}
#       | {"too_many"}.
# An active entry whose record is gone or already ended is stale (its process
# died) and is overwritten. Replay and the refusals write nothing.
# The newest exchange is found from the end of the history stream: only its
# replies (at most ARGV[16]) can follow its user message.
BEGIN_TURN_LUA = """
local idem = redis.call('GET', KEYS[1])
local running = redis.call('HGET', KEYS[3], ARGV[3])
if idem then
  if idem ~= ARGV[1] then
    return {'retry', idem, running or ''}
  end
  return {'replayed', idem, redis.call('HGETALL', KEYS[6])}
end
if running then
  if running ~= ARGV[2] then
    return {'retry', '', running}
  end
  if redis.call('HGET', KEYS[7], 'status') == 'running' then
    return {'in_progress', running}
  end
end
local bound = redis.call('HGET', KEYS[8], 'character_id')
local bind = false
if ARGV[14] ~= '' then
  if bound then
    if bound ~= ARGV[14] then return {'bound', bound} end
  else
    if redis.call('XLEN', KEYS[4]) > 0 then return {'not_empty'} end
    bind = true
  end
end
local mode = ARGV[12]
local exchange = ARGV[4]
local alternative = 0
if mode ~= 'new' then
  local cap = tonumber(ARGV[16])
  local tail = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', cap + 1)
  local user_entry = nil
  local replies = 0
  for _, entry in ipairs(tail) do
    local f = entry[2]
    local role, tid = nil, ''
    for i = 1, #f, 2 do
      if f[i] == 'role' then role = f[i + 1] elseif f[i] == 'turn_id' then tid = f[i + 1] end
    end
    if role == 'user' then user_entry = {entry[1], tid}; break end
    replies = replies + 1
  end
  if not user_entry then
    if #tail > cap then return {'too_many'} end
    return {'not_newest', ''}
  end
  if user_entry[2] ~= ARGV[13] then return {'not_newest', user_entry[2]} end
  if mode == 'regenerate' then
    if replies >= cap then return {'too_many'} end
    exchange = ARGV[13]
    alternative = replies
  else
    for _, entry in ipairs(redis.call('XRANGE', KEYS[4], user_entry[1], '+')) do
      redis.call('XDEL', KEYS[4], entry[1])
    end
    redis.call('HDEL', KEYS[8], 'sel:' .. ARGV[13])
  end
end
local ttl = tonumber(ARGV[10])
redis.call('SET', KEYS[1], ARGV[4], 'EX', ttl)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2],
  'turn_id', ARGV[4], 'user_id', ARGV[5], 'conversation_id', ARGV[3],
  'client_turn_id', ARGV[6], 'status', 'running', 'finish_reason', '',
  'last_seq', '0', 'text', '', 'usage', '{}', 'timings', '{}',
  'created_at_ms', ARGV[9], 'ended_at_ms', '', 'owner', ARGV[8],
  'exchange_id', exchange, 'alternative', tostring(alternative))
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
if bind then
  redis.call('HSET', KEYS[8], 'character_id', ARGV[14])
  if ARGV[15] ~= '' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*',
      'role', 'assistant', 'text', ARGV[15], 'turn_id', '',
      'status', 'greeting', 'created_at', ARGV[9])
    redis.call('HINCRBY', KEYS[8], 'turns', 1)
  end
end
if mode == 'new' then
  redis.call('HINCRBY', KEYS[8], 'turns', 1)
end
if mode ~= 'regenerate' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*',
    'role', 'user', 'text', ARGV[7], 'turn_id', ARGV[4],
    'status', 'complete', 'created_at', ARGV[9])
end
redis.call('ZADD', KEYS[5], ARGV[9], ARGV[3])
return {'accepted', tostring(alternative)}
"""

# bind_conversation: bind a new conversation to a character and store its greeting.
# KEYS: 1 conversation meta hash, 2 history stream, 3 conversations zset.
# ARGV: 1 character_id, 2 greeting ("" none), 3 conversation_id, 4 now_ms,
#       5 history max messages.
# Returns {"created"} | {"exists"} (already bound to this character: nothing
# written) | {"bound", other character} | {"not_empty"}.
BIND_CONVERSATION_LUA = """
local bound = redis.call('HGET', KEYS[1], 'character_id')
if bound then
  if bound == ARGV[1] then return {'exists'} end
  return {'bound', bound}
end
if redis.call('XLEN', KEYS[2]) > 0 then return {'not_empty'} end
redis.call('HSET', KEYS[1], 'character_id', ARGV[1])
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
    'role', 'assistant', 'text', ARGV[2], 'turn_id', '',
    'status', 'greeting', 'created_at', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'turns', 1)
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
return {'created'}
"""

# select_alternative: make one reply the one the model sees for its exchange.
# KEYS: 1 history stream, 2 conversation meta hash.  ARGV: 1 the reply's turn_id.
# Returns {"ok", exchange_id} | {"missing"}.
SELECT_ALTERNATIVE_LUA = """
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-')) do
  local f = entry[2]
  local role, tid, x = nil, nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'role' then role = f[i + 1]
    elseif f[i] == 'turn_id' then tid = f[i + 1]
    elseif f[i] == 'x' then x = f[i + 1] end
  end
  if role == 'assistant' and tid == ARGV[1] then
    local exchange = x or tid
    redis.call('HSET', KEYS[2], 'sel:' .. exchange, tid)
    return {'ok', exchange}
  end
end
return {'missing'}
"""

# append_deltas: add deltas to a running turn's log with ids "seq-0".
# KEYS: 1 turn record, 2 delta log.  ARGV: 1 safety ttl (ms), then seq, text pairs.
# Seqs at or below the record's last_seq are skipped (a retried call is a
# no-op); the rest must continue it without a gap, checked before any write.
# Returns {"ok"} | {"missing"} | {"ended"} | {"gap", last_seq}.
APPEND_DELTAS_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'running' then return {'ended'} end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq'))
local expect = last
for i = 2, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > expect then
    if seq ~= expect + 1 then return {'gap', tostring(last)} end
    expect = seq
  end
end
if expect == last then return {'ok'} end
for i = 2, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then
    redis.call('XADD', KEYS[2], ARGV[i] .. '-0', 't', ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], 'last_seq', tostring(expect))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return {'ok'}
"""

# finish_turn: end a turn once. A second call returns the ended record unchanged.
# The assistant entry names its exchange ("x") when it is a regenerated reply.
# KEYS: 1 turn record, 2 delta log, 3 active hash, 4 history stream,
#       5 conversations zset.
# ARGV: 1 turn_id, 2 conversation_id, 3 finish_reason, 4 text, 5 usage JSON,
#       6 timings JSON, 7 end JSON, 8 now_ms, 9 delta log ttl (ms),
#       10 record ttl (s), 11 history max messages.
# The end entry gets id "<last_seq>-1": it sorts after the last delta, so
# "everything after seq N" is the exclusive range from "N-0".
# Returns {"missing"} | {"mismatch"} | {"already", record} | {"ended", record}.
FINISH_TURN_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if redis.call('HGET', KEYS[1], 'conversation_id') ~= ARGV[2] then
  return {'mismatch'}
end
if status == 'ended' then
  return {'already', redis.call('HGETALL', KEYS[1])}
end
local last = redis.call('HGET', KEYS[1], 'last_seq')
redis.call('XADD', KEYS[2], last .. '-1', 'e', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('HSET', KEYS[1], 'status', 'ended', 'finish_reason', ARGV[3],
  'text', ARGV[4], 'usage', ARGV[5], 'timings', ARGV[6], 'ended_at_ms', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[10])
local exchange = redis.call('HGET', KEYS[1], 'exchange_id')
if exchange and exchange ~= '' and exchange ~= ARGV[1] then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*',
    'role', 'assistant', 'text', ARGV[4], 'turn_id', ARGV[1],
    'status', ARGV[3], 'created_at', ARGV[8], 'x', exchange)
else
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*',
    'role', 'assistant', 'text', ARGV[4], 'turn_id', ARGV[1],
    'status', ARGV[3], 'created_at', ARGV[8])
end
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[2])
end
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[2])
return {'ended', redis.call('HGETALL', KEYS[1])}
"""

# drop_conversation: clear (or delete) a conversation unless a turn runs in it.
# KEYS: 1 active hash, 2 history stream, 3 conversations zset,
#       4 record of the turn ARGV[2] names (placeholder when ARGV[2] is ""),
#       5 conversation meta hash (the character binding and selections go too).
# ARGV: 1 conversation_id, 2 expected active value or "".
# A stale active entry (record gone or ended) is removed. Returns
# {"ok", number of keys/members removed} | {"in_progress", turn_id}
# | {"retry", current active value}.
DROP_CONVERSATION_LUA = """
local running = redis.call('HGET', KEYS[1], ARGV[1])
if running then
  if running ~= ARGV[2] then return {'retry', running} end
  if redis.call('HGET', KEYS[4], 'status') == 'running' then
    return {'in_progress', running}
  end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local n = redis.call('DEL', KEYS[2], KEYS[5]) + redis.call('ZREM', KEYS[3], ARGV[1])
return {'ok', tostring(n)}
"""

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnRecord:
    turn_id: str
    user_id: str
    conversation_id: str
    client_turn_id: str
    status: str  # "running" | "ended"
    finish_reason: str | None
    last_seq: int
    text: str  # the final reply text; "" while running
    usage: dict
    timings: dict
    created_at_ms: int
    ended_at_ms: int | None
    owner: str  # the server process running the turn
    # The exchange the reply belongs to: the turn that stored the user message
    # (the turn itself, unless it is a regenerated reply).
    exchange_id: str = ""
    # Its index among the exchange's replies (0: the first reply).
    alternative: int = 0


@dataclass(frozen=True, slots=True)
class BeginOutcome:
    """``turn`` is set for accepted and replayed (None only if a replayed turn's
    record vanished at the very moment its idempotency key expired);
    ``running_turn_id`` is set for in_progress."""

    kind: Literal["accepted", "replayed", "in_progress"]
    turn: TurnRecord | None
    running_turn_id: str | None
    # The accepted reply's index among its exchange's alternatives.
    alternative: int | None = None


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    id: str
    role: str
    text: str
    turn_id: str
    status: str  # "complete" for user messages, the finish_reason for assistant ones, "greeting"
    created_at: int  # ms since epoch
    # The exchange: the user message's turn id; for a reply, the turn that
    # stored the user message it answers; "" for a greeting.
    exchange_id: str = ""


@dataclass(frozen=True, slots=True)
class LogDelta:
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class LogEnd:
    end: dict


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.ReadOnlyError,
    rexc.SlotNotCoveredError,  # a cluster whose slots are not all served (a failover in progress)
    OSError,  # includes the builtin TimeoutError
)


def _cluster_unreachable(exc: rexc.RedisClusterException) -> bool:
    """True when a cluster client's own error means "cannot reach the cluster".

    redis-py raises ``RedisClusterException`` (not a ``RedisError``) when no
    startup node answers, with the connection failure as its cause; its other
    uses (cross-slot keys, bad arguments) are bugs, not outages.
    """
    return isinstance(exc, rexc.SlotNotCoveredError) or isinstance(exc.__cause__, _UNAVAILABLE_ERRORS)


_STREAM_ID = re.compile(r"\A([0-9]{1,20})-([0-9]{1,20})\Z")
_U64_MAX = 2**64 - 1
_MAX_ATTEMPTS = 16
#: Most replies one exchange keeps (regenerations beyond are refused).
MAX_ALTERNATIVES = 32

_P = ParamSpec("_P")
_R = TypeVar("_R")


#: What ``unavailable`` tells a client to wait before trying again while Redis is away.
RETRY_AFTER_MS = 1000

# At most one log line per this many seconds about Redis failures: an outage
# makes every request fail, and the log should say so without drowning.
_LOG_EVERY_S = 5.0
_last_logged = 0.0
_unlogged = 0
# Every failed Redis call of this process, by kind ("unavailable" or "error"):
# what /metrics reports (server.metrics reads it when scraped).
_failures = {"unavailable": 0, "error": 0}


def redis_failures() -> dict[str, int]:
    """How many Redis calls of this process failed so far, by kind (``unavailable``, ``error``)."""
    return dict(_failures)


def _log_failure(exc: BaseException, where: str) -> None:
    global _last_logged, _unlogged
    _failures["unavailable"] += 1
    now = time.monotonic()
    if now - _last_logged < _LOG_EVERY_S:
        _unlogged += 1
        return
    log.warning("redis failed in %s: %s: %s (%d more failures since the last report)",
                where, type(exc).__name__, exc, _unlogged)
    _last_logged, _unlogged = now, 0


def storage_unavailable() -> Unavailable:
    """The ``unavailable`` error for a Redis outage, as a client may see it.

    Its text is fixed: the exception text of a failed connection names Redis'
    host and port, which is for the server's log only.
    """
    return Unavailable("storage unavailable; retry shortly", retry_after_ms=RETRY_AFTER_MS)


def redis_guarded(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Re-raise Redis connectivity failures as Unavailable, other Redis errors as RapportError.

    The details (which may name the server's address) go to the log, not into
    the message, which reaches clients.
    """

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except RapportError:
            raise
        except _UNAVAILABLE_ERRORS as exc:
            _log_failure(exc, fn.__qualname__)
            raise storage_unavailable() from exc
        except rexc.RedisClusterException as exc:
            if _cluster_unreachable(exc):
                _log_failure(exc, fn.__qualname__)
                raise storage_unavailable() from exc
            _failures["error"] += 1
            log.error("redis cluster error in %s: %s: %s", fn.__qualname__, type(exc).__name__, exc)
            raise RapportError("storage error") from exc
        except rexc.RedisError as exc:
            _failures["error"] += 1
            log.error("redis error in %s: %s: %s", fn.__qualname__, type(exc).__name__, exc)
            raise RapportError("storage error") from exc

    return wrapper


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _pairs_to_dict(flat: Sequence[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _record(data: dict[str, str] | None) -> TurnRecord | None:
    if not data or "status" not in data:
        return None
    ended = data.get("ended_at_ms") or ""
    return TurnRecord(
        turn_id=data.get("turn_id", ""),
        user_id=data.get("user_id", ""),
        conversation_id=data.get("conversation_id", ""),
        client_turn_id=data.get("client_turn_id", ""),
        status=data["status"],
        finish_reason=data.get("finish_reason") or None,
        last_seq=int(data.get("last_seq") or 0),
        text=data.get("text", ""),
        usage=json.loads(data.get("usage") or "{}"),
        timings=json.loads(data.get("timings") or "{}"),
        created_at_ms=int(data.get("created_at_ms") or 0),
        ended_at_ms=int(ended) if ended else None,
        owner=data.get("owner", ""),
        exchange_id=data.get("exchange_id") or data.get("turn_id", ""),
        alternative=int(data.get("alternative") or 0),
    )


def _log_item(entry_id: str, fields: dict[str, str]) -> LogDelta | LogEnd:
    if "e" in fields:
        return LogEnd(end=json.loads(fields["e"]))
    return LogDelta(seq=int(entry_id.split("-", 1)[0]), text=fields.get("t", ""))


def _history_end(limit: object, before: str | None) -> str | None:
    """The XREVRANGE upper bound for a history page; None: the page is empty."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadRequest("limit must be a positive integer")
    if before is None:
        return "+"
    m = _STREAM_ID.match(before) if isinstance(before, str) else None
    if m is None or int(m.group(1)) > _U64_MAX or int(m.group(2)) > _U64_MAX:
        raise BadRequest("before is not a message id")
    if int(m.group(1)) == 0 and int(m.group(2)) == 0:
        return None
    return f"({int(m.group(1))}-{int(m.group(2))}"


def _history_messages(entries: Sequence[Any]) -> list[HistoryMessage]:
    """XREVRANGE entries (newest first) as messages, oldest first."""
    out = [
        HistoryMessage(
            id=eid,
            role=f.get("role", ""),
            text=f.get("text", ""),
            turn_id=f.get("turn_id", ""),
            status=f.get("status", ""),
            created_at=int(f.get("created_at") or 0),
            exchange_id=f.get("x") or f.get("turn_id", ""),
        )
        for eid, f in entries
    ]
    out.reverse()
    return out


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    return value


def _check_nonneg(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


class ConversationStore:
    """Conversations, turn records and delta logs in Redis.

    ``redis`` must be created with ``decode_responses=True``. ``blocking_redis``
    (default: ``redis``) serves only :meth:`follow_log`'s ``XREAD BLOCK``; use a
    dedicated client whose ``socket_timeout`` exceeds the ``block_ms`` you pass.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: KeySpace,
        *,
        idempotency_ttl_s: int = 86400,
        delta_log_ttl_s: int = 600,
        history_max_messages: int = 1000,
        blocking_redis: aioredis.Redis | None = None,
    ) -> None:
        for name, value in (
            ("idempotency_ttl_s", idempotency_ttl_s),
            ("delta_log_ttl_s", delta_log_ttl_s),
            ("history_max_messages", history_max_messages),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Typed as Any on purpose: redis-py types every reply as ``bytes | str``
        # whatever the client's decode_responses, and the store's clients always
        # decode (server.runtime creates them with decode_responses=True).
        self.redis: Any = redis
        self.blocking_redis: Any = blocking_redis if blocking_redis is not None else redis
        self.keys = keys
        self.idempotency_ttl_s = idempotency_ttl_s
        self.delta_log_ttl_s = delta_log_ttl_s
        self.history_max_messages = history_max_messages
        self._begin = redis.register_script(BEGIN_TURN_LUA)
        self._append = redis.register_script(APPEND_DELTAS_LUA)
        self._finish = redis.register_script(FINISH_TURN_LUA)
        self._drop = redis.register_script(DROP_CONVERSATION_LUA)
        self._bind = redis.register_script(BIND_CONVERSATION_LUA)
        self._select = redis.register_script(SELECT_ALTERNATIVE_LUA)

    # -- health -------------------------------------------------------------

    @redis_guarded
    async def ping(self) -> None:
        await self.redis.ping()

    @redis_guarded
    async def load_scripts(self) -> None:
        """Load the Lua scripts into Redis' script cache ahead of their first use.

        The scripts run with EVALSHA; a server that does not know one answers
        NOSCRIPT and redis-py loads it and tries again: two more round trips on
        the first turn after a start (or after Redis restarted, which empties
        the cache). Loading them at start keeps even the first turn at two.
        """
        for script in (self._begin, self._append, self._finish, self._drop, self._bind, self._select):
            await self.redis.script_load(script.script)

    # -- turns --------------------------------------------------------------

    @redis_guarded
    async def begin_turn(
        self,
        *,
        user_id: str,
        conversation_id: str,
        client_turn_id: str,
        text: str,
        turn_id: str,
        owner: str,
        now_ms: int,
        mode: Literal["new", "regenerate", "edit"] = "new",
        exchange_id: str = "",
        character_id: str = "",
        greeting: str = "",
    ) -> BeginOutcome:
        """Accept a new turn, or report a replay / a running turn (guarantees 1 and 4).

        ``mode`` "regenerate" adds a reply to the newest exchange (``exchange_id``)
        without storing a user message; "edit" replaces that exchange's user
        message and replies with ``text``. ``character_id`` binds a conversation
        without history to a character (storing ``greeting`` as its first
        message) or checks the binding. Refusals raise BadRequest.
        """
        if mode not in ("new", "regenerate", "edit"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode != "new" and not exchange_id:
            raise ValueError(f"mode {mode!r} needs the exchange_id")
        for name, value in (
            ("user_id", user_id),
            ("conversation_id", conversation_id),
            ("client_turn_id", client_turn_id),
            ("text", text),
            ("owner", owner),
        ):
            _check_id(name, value)
        if not _check_id("turn_id", turn_id):
            raise ValueError("turn_id must not be empty")
        _check_nonneg("now_ms", now_ms)
        k = self.keys
        idem_key = k.idempotency(user_id, client_turn_id)
        new_key = k.turn(user_id, turn_id)
        active_key = k.active(user_id)
        expect_idem = ""
        expect_active = ""
        for _ in range(_MAX_ATTEMPTS):
            res = await self._begin(
                keys=[
                    idem_key,
                    new_key,
                    active_key,
                    k.history(user_id, conversation_id),
                    k.conversations(user_id),
                    k.turn(user_id, expect_idem) if expect_idem else new_key,
                    k.turn(user_id, expect_active) if expect_active else new_key,
                    k.conversation_meta(user_id, conversation_id),
                ],
                args=[
                    expect_idem,
                    expect_active,
                    conversation_id,
                    turn_id,
                    user_id,
                    client_turn_id,
                    text,
                    owner,
                    str(now_ms),
                    str(self.idempotency_ttl_s),
                    str(self.history_max_messages),
                    mode,
                    exchange_id,
                    character_id,
                    greeting,
                    str(MAX_ALTERNATIVES),
                ],
            )
            kind = res[0]
            if kind == "retry":
                expect_idem, expect_active = res[1], res[2]
                continue
            if kind == "accepted":
                new = self._new_record(turn_id, user_id, conversation_id, client_turn_id, owner, now_ms,
                                       exchange_id if mode == "regenerate" else turn_id, int(res[1]))
                return BeginOutcome("accepted", new, None, alternative=new.alternative)
            if kind == "bound":
                raise BadRequest(f"conversation '{conversation_id}' is bound to character '{res[1]}'",
                                 client_turn_id=client_turn_id)
            if kind == "not_empty":
                raise BadRequest(f"conversation '{conversation_id}' already has history without a "
                                 "character; start a new conversation to talk to one",
                                 client_turn_id=client_turn_id)
            if kind == "not_newest":
                raise BadRequest("only the newest exchange can be regenerated or edited"
                                 + (f" (it is '{res[1]}')" if res[1] else "; the conversation has none"),
                                 client_turn_id=client_turn_id)
            if kind == "too_many":
                raise BadRequest(f"an exchange keeps at most {MAX_ALTERNATIVES} alternatives",
                                 client_turn_id=client_turn_id)
            if kind == "replayed":
                record = _record(_pairs_to_dict(res[2]))
                if res[1] == turn_id and record is not None and record.client_turn_id == client_turn_id:
                    # Our own earlier attempt got through (the client retried
                    # after a timeout): this call accepted the turn.
                    return BeginOutcome("accepted", record, None,
                                        alternative=record.alternative if record is not None else None)
                return BeginOutcome("replayed", record, None,
                                    alternative=record.alternative if record is not None else None)
            if kind == "in_progress":
                return BeginOutcome("in_progress", None, res[1])
            raise RapportError(f"begin_turn: unexpected script answer {kind!r}")
        raise Unavailable("begin_turn: too much contention, try again", retry_after_ms=RETRY_AFTER_MS)

    @staticmethod
    def _new_record(
        turn_id: str, user_id: str, conversation_id: str, client_turn_id: str, owner: str, now_ms: int,
        exchange_id: str, alternative: int,
    ) -> TurnRecord:
        return TurnRecord(
            turn_id=turn_id,
            user_id=user_id,
            conversation_id=conversation_id,
            client_turn_id=client_turn_id,
            status="running",
            finish_reason=None,
            last_seq=0,
            text="",
            usage={},
            timings={},
            created_at_ms=now_ms,
            ended_at_ms=None,
            owner=owner,
            exchange_id=exchange_id,
            alternative=alternative,
        )

    @redis_guarded
    async def append_deltas(
        self, *, user_id: str, turn_id: str, deltas: Sequence[tuple[int, str]]
    ) -> None:
        """Append deltas ``(seq, text)`` (contiguous from the record's last_seq + 1).

        One round trip. Seqs already stored are skipped, so retrying a call is
        harmless. Raises NotFound when the record is gone; appending to an ended
        turn is ignored (the end entry is final); a gap raises RapportError.
        """
        if not deltas:
            return
        args: list[str] = [str(self.idempotency_ttl_s * 1000)]
        prev: int | None = None
        for seq, text in deltas:
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise ValueError(f"seq must be a positive int, got {seq!r}")
            if prev is not None and seq != prev + 1:
                raise ValueError(f"seqs must be contiguous: {prev} then {seq}")
            _check_id("text", text)
            args += [str(seq), text]
            prev = seq
        res = await self._append(
            keys=[self.keys.turn(user_id, turn_id), self.keys.delta_log(user_id, turn_id)],
            args=args,
        )
        kind = res[0]
        if kind in ("ok", "ended"):
            return
        if kind == "missing":
            raise NotFound("turn not found", turn_id=turn_id)
        if kind == "gap":
            raise RapportError(
                f"append_deltas: seq {deltas[0][0]} does not follow last_seq {res[1]}", turn_id=turn_id
            )
        raise RapportError(f"append_deltas: unexpected script answer {kind!r}")

    @redis_guarded
    async def append_deltas_many(
        self, batches: Sequence[tuple[str, str, Sequence[tuple[int, str]]]]
    ) -> dict[str, str]:
        """``append_deltas`` for many turns in one pipelined round trip.

        ``batches`` holds ``(user_id, turn_id, deltas)``. Returns the turns whose
        append failed, with why ("missing", "gap: ..."); the others succeeded
        (appending to an ended turn counts as success, as in ``append_deltas``).
        """
        order: list[str] = []
        calls: list[ScriptCall] = []
        for user_id, turn_id, deltas in batches:
            args: list[str] = [str(self.idempotency_ttl_s * 1000)]
            for seq, text in deltas:
                args += [str(seq), text]
            calls.append((self._append, [self.keys.turn(user_id, turn_id), self.keys.delta_log(user_id, turn_id)],
                          args))
            order.append(turn_id)
        results = await run_scripts(self.redis, calls, raise_on_error=False)
        failed: dict[str, str] = {}
        for turn_id, res in zip(order, results, strict=True):
            if isinstance(res, Exception):
                if isinstance(res, _UNAVAILABLE_ERRORS) or (
                        isinstance(res, rexc.RedisClusterException) and _cluster_unreachable(res)):
                    raise res
                failed[turn_id] = f"error: {res}"
            elif res[0] not in ("ok", "ended"):
                failed[turn_id] = str(res[0]) if res[0] != "gap" else f"gap after {res[1]}"
        return failed

    @redis_guarded
    async def finish_turn(
        self,
        *,
        user_id: str,
        turn_id: str,
        finish_reason: str,
        text: str,
        usage: dict,
        timings: dict,
        end: dict,
        now_ms: int,
    ) -> TurnRecord:
        """End the turn once (idempotent): end entry, record, assistant history entry, free the conversation."""
        _check_id("finish_reason", finish_reason)
        _check_id("text", text)
        _check_nonneg("now_ms", now_ms)
        k = self.keys
        turn_key = k.turn(user_id, turn_id)
        # The conversation id never changes once the record exists; it names
        # the history key the script must declare.
        conversation_id = await self.redis.hget(turn_key, "conversation_id")
        if conversation_id is None:
            raise NotFound("turn not found", turn_id=turn_id)
        res = await self._finish(
            keys=[
                turn_key,
                k.delta_log(user_id, turn_id),
                k.active(user_id),
                k.history(user_id, conversation_id),
                k.conversations(user_id),
            ],
            args=[
                turn_id,
                conversation_id,
                finish_reason,
                text,
                _dumps(usage),
                _dumps(timings),
                _dumps(end),
                str(now_ms),
                str(self.delta_log_ttl_s * 1000),
                str(self.idempotency_ttl_s),
                str(self.history_max_messages),
            ],
        )
        kind = res[0]
        if kind in ("ended", "already"):
            record = _record(_pairs_to_dict(res[1]))
            assert record is not None
            return record
        if kind in ("missing", "mismatch"):
            raise NotFound("turn not found", turn_id=turn_id)
        raise RapportError(f"finish_turn: unexpected script answer {kind!r}")

    @redis_guarded
    async def get_turn(self, *, user_id: str, turn_id: str) -> TurnRecord | None:
        return _record(await self.redis.hgetall(self.keys.turn(user_id, turn_id)))

    @redis_guarded
    async def active_turns(self, *, user_id: str) -> list[TurnRecord]:
        """The user's running turns, oldest first; stale ``active`` entries are skipped."""
        active = await self.redis.hgetall(self.keys.active(user_id))
        if not active:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for turn_id in active.values():
            pipe.hgetall(self.keys.turn(user_id, turn_id))
        out: list[TurnRecord] = []
        for (conv, _turn_id), data in zip(active.items(), await pipe.execute(), strict=True):
            rec = _record(data)
            if rec is not None and rec.status == "running" and rec.conversation_id == conv:
                out.append(rec)
        out.sort(key=lambda r: (r.created_at_ms, r.turn_id))
        return out

    # -- delta log ----------------------------------------------------------

    @redis_guarded
    async def read_log(
        self, *, user_id: str, turn_id: str, after_seq: int, count: int | None = None
    ) -> list[LogDelta | LogEnd]:
        """Entries after ``after_seq`` (exclusive), in order; the end entry comes last."""
        _check_nonneg("after_seq", after_seq)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count must be a positive int, got {count!r}")
        entries = await self.redis.xrange(
            self.keys.delta_log(user_id, turn_id), min=f"({after_seq}-0", max="+", count=count
        )
        return [_log_item(eid, fields) for eid, fields in entries]

    @redis_guarded
    async def follow_log(
        self, *, user_id: str, turn_id: str, after_seq: int, block_ms: int
    ) -> list[LogDelta | LogEnd]:
        """Wait up to ``block_ms`` for entries after ``after_seq``; [] on timeout.

        Uses ``blocking_redis`` (XREAD BLOCK holds its connection). ``block_ms``
        0 waits forever, as in Redis. A log that does not exist yet is waited for.
        """
        _check_nonneg("after_seq", after_seq)
        _check_nonneg("block_ms", block_ms)
        key = self.keys.delta_log(user_id, turn_id)
        res = await self.blocking_redis.xread({key: f"{after_seq}-0"}, block=block_ms)
        if not res:
            return []
        if isinstance(res, dict):  # RESP3: {key: [[(id, fields), ...]]}
            entries = next(iter(res.values()))
            if entries and isinstance(entries[0], list):
                entries = entries[0]
        else:  # RESP2: [[key, [(id, fields), ...]]]
            entries = res[0][1]
        return [_log_item(eid, fields) for eid, fields in entries]

    @redis_guarded
    async def log_exists(self, *, user_id: str, turn_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.delta_log(user_id, turn_id)))

    # -- history ------------------------------------------------------------

    @redis_guarded
    async def history(
        self, *, user_id: str, conversation_id: str, limit: int = 50, before: str | None = None
    ) -> list[HistoryMessage]:
        """The newest ``limit`` messages (older than ``before`` when given), oldest first."""
        end = _history_end(limit, before)
        if end is None:
            return []
        entries = await self.redis.xrevrange(
            self.keys.history(user_id, conversation_id), max=end, min="-", count=limit
        )
        return _history_messages(entries)

    @redis_guarded
    async def history_with(
        self, *, user_id: str, conversation_id: str, limit: int, also: Callable[[Any], None]
    ) -> tuple[list[HistoryMessage], dict[str, str], list[Any]]:
        """:meth:`history` (newest ``limit``) and the conversation's meta hash
        (see :meth:`conversation_meta`), with the caller's commands in the same round
        trip; the third item holds the replies to the caller's commands, in order.

        ``also`` queues commands on a non-transactional pipeline: they travel
        in one write and Redis runs one connection's commands in order, so the
        caller's commands cost no round trip of their own (but are not atomic
        with the read). The first error is raised.
        """
        _history_end(limit, None)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.history(user_id, conversation_id), max="+", min="-", count=limit)
        pipe.hgetall(self.keys.conversation_meta(user_id, conversation_id))
        also(pipe)
        replies = await pipe.execute()
        return _history_messages(replies[0]), replies[1] or {}, list(replies[2:])

    @redis_guarded
    async def conversation_meta(self, *, user_id: str, conversation_id: str) -> dict[str, str]:
        """The conversation's binding and selections: ``character_id`` and
        ``sel:<exchange_id>`` -> the selected reply's turn id."""
        return await self.redis.hgetall(self.keys.conversation_meta(user_id, conversation_id)) or {}

    @redis_guarded
    async def history_and_meta(
        self, *, user_id: str, conversation_id: str, limit: int = 50, before: str | None = None
    ) -> tuple[list[HistoryMessage], dict[str, str]]:
        """:meth:`history` and :meth:`conversation_meta` in one round trip."""
        end = _history_end(limit, before)
        pipe = self.redis.pipeline(transaction=False)
        if end is not None:
            pipe.xrevrange(self.keys.history(user_id, conversation_id), max=end, min="-", count=limit)
        pipe.hgetall(self.keys.conversation_meta(user_id, conversation_id))
        replies = await pipe.execute()
        if end is None:
            return [], replies[0] or {}
        return _history_messages(replies[0]), replies[1] or {}

    @redis_guarded
    async def bind_conversation(self, *, user_id: str, conversation_id: str, character_id: str,
                                greeting: str, now_ms: int) -> bool:
        """Bind a conversation without history to a character, storing its greeting.

        True when this call bound it; False when it was already bound to this
        character (nothing written). BadRequest when it is bound to another or
        has plain history.
        """
        _check_id("conversation_id", conversation_id)
        _check_id("character_id", character_id)
        _check_id("greeting", greeting)
        _check_nonneg("now_ms", now_ms)
        k = self.keys
        res = await self._bind(
            keys=[k.conversation_meta(user_id, conversation_id), k.history(user_id, conversation_id),
                  k.conversations(user_id)],
            args=[character_id, greeting, conversation_id, str(now_ms), str(self.history_max_messages)],
        )
        kind = res[0]
        if kind == "created":
            return True
        if kind == "exists":
            return False
        if kind == "bound":
            raise BadRequest(f"conversation '{conversation_id}' is bound to character '{res[1]}'")
        if kind == "not_empty":
            raise BadRequest(f"conversation '{conversation_id}' already has history without a character")
        raise RapportError(f"bind_conversation: unexpected script answer {kind!r}")

    @redis_guarded
    async def select_alternative(self, *, user_id: str, conversation_id: str, turn_id: str) -> str:
        """Make the reply of ``turn_id`` the one the model sees for its exchange; the exchange id.

        NotFound when the conversation's history holds no such reply (yet).
        """
        _check_id("turn_id", turn_id)
        k = self.keys
        res = await self._select(keys=[k.history(user_id, conversation_id),
                                       k.conversation_meta(user_id, conversation_id)], args=[turn_id])
        if res[0] == "ok":
            return str(res[1])
        raise NotFound("no such reply in this conversation", turn_id=turn_id)

    async def _drop_conversation(self, user_id: str, conversation_id: str) -> int:
        k = self.keys
        history_key = k.history(user_id, conversation_id)
        expect = ""
        for _ in range(_MAX_ATTEMPTS):
            res = await self._drop(
                keys=[
                    k.active(user_id),
                    history_key,
                    k.conversations(user_id),
                    k.turn(user_id, expect) if expect else history_key,
                    k.conversation_meta(user_id, conversation_id),
                ],
                args=[conversation_id, expect],
            )
            kind = res[0]
            if kind == "retry":
                expect = res[1]
                continue
            if kind == "in_progress":
                raise TurnInProgress("the conversation has a running turn", turn_id=res[1])
            if kind == "ok":
                return int(res[1])
            raise RapportError(f"unexpected script answer {kind!r}")
        raise Unavailable("too much contention, try again", retry_after_ms=RETRY_AFTER_MS)

    @redis_guarded
    async def clear_history(self, *, user_id: str, conversation_id: str) -> None:
        """Drop the conversation's history; TurnInProgress while a turn runs in it."""
        _check_id("conversation_id", conversation_id)
        await self._drop_conversation(user_id, conversation_id)

    @redis_guarded
    async def delete_conversation(self, *, user_id: str, conversation_id: str) -> bool:
        """Like :meth:`clear_history`; False when there was nothing to delete."""
        _check_id("conversation_id", conversation_id)
        return await self._drop_conversation(user_id, conversation_id) > 0

    @redis_guarded
    async def list_conversations(self, *, user_id: str) -> list[tuple[str, int]]:
        """(conversation_id, last activity ms), newest first."""
        rows = await self.redis.zrevrange(self.keys.conversations(user_id), 0, -1, withscores=True)
        return [(member, int(score)) for member, score in rows]

    # -- users --------------------------------------------------------------

    @redis_guarded
    async def delete_user(self, *, user_id: str) -> int:
        """UNLINK every key under the user's tag (any module's); returns how many went."""
        pattern = self.keys.user_pattern(user_id)
        deleted = 0
        batch: list[str] = []
        # Every key of the user shares the tag, hence one slot: on a cluster only its node is scanned.
        async for key in scan_slot_of(self.redis, self.keys.user_key(user_id, ""), match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self.redis.unlink(*batch)
                batch = []
        if batch:
            deleted += await self.redis.unlink(*batch)
        return deleted
