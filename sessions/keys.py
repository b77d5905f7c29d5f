"""Redis key naming for everything Rapport stores.

Layout (``P`` is the prefix, ``U``/``C``/``T``/``K`` the escaped user id,
conversation id, turn id and client turn id)::

    P{u:U}:hist:C        stream  conversation history (user + assistant messages)
    P{u:U}:convs         zset    raw conversation_id -> last activity (ms)
    P{u:U}:active        hash    raw conversation_id -> running turn_id
    P{u:U}:idem:K        string  client_turn_id -> turn_id (idempotency)
    P{u:U}:turn:T        hash    the turn record
    P{u:U}:log:T         stream  the turn's delta log (ids "seq-0", end "last-1")
    P{u:U}:conv:C        hash    the conversation's binding (character_id) and
                                 selected alternatives ("sel:<exchange_id>" -> turn_id)
    P{u:U}:train:X       hash    the training snapshot of exchange X (feedback, selection)
    P{u:U}:facts         hash    the user's pinned facts: fact id -> "<created_at_ms>:<text>"
    Prunning             zset    "user\0turn" -> lease expiry of every running turn
    Pctl:O               pubsub  control messages for server process O
    Paudit               stream  the deployment's audit log (server.audit)
    P{chars}:char:I      string  one character (JSON), I the escaped character id
    P{chars}:index       zset    character id -> last update (ms)
    Ptraining            zset    "user\0exchange" -> last update (ms) of every training snapshot

Every key of one user carries the Redis Cluster hash tag ``{u:U}``, so all of a
user's keys live in one slot and multi-key Lua scripts work on Cluster.

On Redis Cluster (``--redis-url redis+cluster://...``) the other keys are placed so:

* the characters share ``{chars}``: one slot, so the put/delete scripts and
  ``MGET`` of a listing may touch several of them (the catalog is small and
  cached per process, so the one node holding it is not a hot spot);
* ``Prunning``, ``Ptraining`` and ``Paudit`` carry no tag on purpose: each is a
  single key that no script touches together with another key, so it needs no
  slot in common with anything; pipelines that mix it with a user's keys are
  non-transactional and redis-py's cluster pipeline splits them per node;
* ``Pctl:O`` is a sharded pub/sub channel on a cluster (``SPUBLISH`` /
  ``SSUBSCRIBE``, Redis 7), which lives in the slot of its name like a key;
  see :mod:`server.coordination` for why.

Scans of one user (``delete_user``) go to the node holding the user's slot only
(:mod:`sessions.cluster`).

Escaping percent-encodes (UTF-8, ``%XX`` upper case) every byte outside
``[A-Za-z0-9._-]``. That is injective (``%`` itself is encoded), and the escaped
form contains no ``{``, ``}``, ``:`` nor any glob metacharacter, so ids can
neither collide, break the hash tag, nor widen a SCAN pattern.
"""

from __future__ import annotations

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_GLOB_SPECIAL = frozenset("*?[]\\")


def escape_id(value: str) -> str:
    """Percent-encode ``value`` so it is safe inside a key segment (injective)."""
    if not isinstance(value, str):
        raise TypeError(f"id must be str, not {type(value).__name__}")
    raw = value.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def glob_escape(value: str) -> str:
    """Escape Redis glob metacharacters (``* ? [ ] \\``) so they match literally."""
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in value)


class KeySpace:
    """Builds every Redis key; see the module docstring for the layout."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "rapport:") -> None:
        if not isinstance(prefix, str):
            raise TypeError("prefix must be str")
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"KeySpace(prefix={self.prefix!r})"

    # -- per user -----------------------------------------------------------

    def user_tag(self, user_id: str) -> str:
        """The Cluster hash tag shared by all keys of ``user_id``: ``{u:<esc>}``."""
        return "{u:" + escape_id(user_id) + "}"

    def _base(self, user_id: str) -> str:
        return self.prefix + self.user_tag(user_id)

    def user_key(self, user_id: str, suffix: str) -> str:
        """A key under the user's tag for other modules (rate limits, leases...).

        ``suffix`` is appended verbatim after ``:``; keep it free of user input
        or escape that part with :func:`escape_id`. Such keys are removed by
        :meth:`sessions.store.ConversationStore.delete_user` too.
        """
        return f"{self._base(user_id)}:{suffix}"

    def user_pattern(self, user_id: str) -> str:
        """SCAN MATCH pattern for every key of ``user_id`` and no other user's.

        The closing ``}`` of the tag ends the match of the id, so ``bob`` never
        matches ``bob2``; the escaped id holds no glob metacharacters, and the
        prefix is glob-escaped in case it holds any.
        """
        return glob_escape(self.prefix) + "{u:" + escape_id(user_id) + "}*"

    def history(self, user_id: str, conversation_id: str) -> str:
        return f"{self._base(user_id)}:hist:{escape_id(conversation_id)}"

    def conversations(self, user_id: str) -> str:
        return f"{self._base(user_id)}:convs"

    def active(self, user_id: str) -> str:
        return f"{self._base(user_id)}:active"

    def idempotency(self, user_id: str, client_turn_id: str) -> str:
        return f"{self._base(user_id)}:idem:{escape_id(client_turn_id)}"

    def turn(self, user_id: str, turn_id: str) -> str:
        return f"{self._base(user_id)}:turn:{escape_id(turn_id)}"

    def delta_log(self, user_id: str, turn_id: str) -> str:
        return f"{self._base(user_id)}:log:{escape_id(turn_id)}"

    def conversation_meta(self, user_id: str, conversation_id: str) -> str:
        """hash: the conversation's ``character_id`` and ``sel:<exchange_id>`` -> selected turn_id."""
        return f"{self._base(user_id)}:conv:{escape_id(conversation_id)}"

    def training(self, user_id: str, exchange_id: str) -> str:
        """hash: the training snapshot of one exchange (prompt, alternatives, ratings, choice)."""
        return f"{self._base(user_id)}:train:{escape_id(exchange_id)}"

    def facts(self, user_id: str) -> str:
        """hash: the user's pinned facts, fact id -> ``"<created_at_ms>:<text>"`` (sessions.memory)."""
        return f"{self._base(user_id)}:facts"

    # -- process-level keys (no user tag: each is a single-key structure) --

    def running_index(self) -> str:
        """zset ``user \\0 turn_id`` -> lease expiry (ms since epoch) of every running turn."""
        return f"{self.prefix}running"

    def control_channel(self, owner: str) -> str:
        """Pub/sub channel on which the process ``owner`` takes cancel/attach/detach requests."""
        return f"{self.prefix}ctl:{escape_id(owner)}"

    def character(self, character_id: str) -> str:
        """string: one character's JSON. Every character key shares the ``{chars}`` tag."""
        return f"{self.prefix}{{chars}}:char:{escape_id(character_id)}"

    def character_index(self) -> str:
        """zset: character id -> last update (ms since epoch)."""
        return f"{self.prefix}{{chars}}:index"

    def training_index(self) -> str:
        """zset ``user \\0 exchange_id`` -> last update (ms) of every training snapshot (for export)."""
        return f"{self.prefix}training"

    def audit(self) -> str:
        """stream: the deployment's audit log, one for every process sharing the prefix."""
        return f"{self.prefix}audit"
