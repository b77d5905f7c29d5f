"""Conversation memory: folding the turns a prompt window trimmed into a running summary.

When the prompt window drops turns from the front (``sessions.prompt``), the
turn manager hands the dropped turns to :meth:`Summarizer.maybe_fold`, which
returns at once. If some of them are not in the stored summary yet
(``sessions.summary.turns_to_fold``), a background task asks the engine to fold
them into the summary and stores the result in the conversation's meta hash
(``summary``, ``summary_upto``); the next turns show it to the model right
after the system prompt (``sessions.summary.summary_block``).

Why it costs user turns nothing:

* The engine request has background priority (``EngineRequest.priority``):
  vLLM's ``priority`` scheduling policy and the simulated engine schedule a
  waiting user turn before it, and admission control does not count it ahead
  of a user turn (``server.admission``).
* Nothing awaits it: the turn that trimmed is already generating with the
  summary it read.
* Between trims the dropped turns do not change, so nothing is folded and the
  summary -- and with it the prompt prefix vLLM caches -- stays the same.

Several gateway processes share one Redis and may see the same trim. One fold
per conversation runs in a process (a task per conversation), one across
processes (a short lock under the user's hash tag, ``SET NX PX``), and the
result is stored only if ``summary_upto`` is still what the fold started from
(compare-and-set in Lua): a fold that lost the race changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rexc

from protocol.errors import RapportError
from sessions.keys import KeySpace, escape_id
from sessions.messages import ChatMessage
from sessions.prompt import PastTurn
from sessions.summary import (
    SUMMARY_NEXT_UPTO_FIELD,
    SUMMARY_UPTO_FIELD,
    fold_mark,
    fold_messages,
    shown_summary,
    turns_to_fold,
)

from .engines.base import BACKGROUND_PRIORITY, Engine, EngineDelta, EngineFinish, EngineRequest, SamplingOptions
from .metrics import Metrics

__all__ = ["Summarizer", "SummaryError"]

log = logging.getLogger("rapport.summaries")

#: Sampling of a fold: a summary should be faithful, not creative.
SUMMARY_TEMPERATURE = 0.2
#: Words asked for per token allowed (English runs about 0.75 words a token;
#: asking for fewer keeps the summary from being cut off by max_tokens).
WORDS_PER_TOKEN = 0.6
#: Small models tend to go on with the transcript they were shown instead of
#: ending the summary; a new transcript line ends it.
TRANSCRIPT_STOPS = ("\nUser:", "\nCompanion:")

# store_summary: compare-and-set the conversation's summary, shown or staged.
# KEYS: 1 conversation meta hash, 2 history stream.
# ARGV: 1 summary_upto and 2 summary_next_upto the fold started from ("" none),
#       3 summary, 4 its upto, 5 slot: "shown" (summary, summary_upto; the staged
#       pair is dropped when ARGV[6] is "1": the fold started from it) or "next"
#       (the staged pair, shown once the window drops what it covers).
# Returns "stored" | "lost" (another fold stored first) | "gone" (the
# conversation was deleted meanwhile: nothing is written, so it is not revived).
STORE_SUMMARY_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 'gone' end
if (redis.call('HGET', KEYS[1], 'summary_upto') or '') ~= ARGV[1] then return 'lost' end
if (redis.call('HGET', KEYS[1], 'summary_next_upto') or '') ~= ARGV[2] then return 'lost' end
if ARGV[5] == 'next' then
  redis.call('HSET', KEYS[1], 'summary_next', ARGV[3], 'summary_next_upto', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'summary', ARGV[3], 'summary_upto', ARGV[4])
  if ARGV[6] == '1' then redis.call('HDEL', KEYS[1], 'summary_next', 'summary_next_upto') end
end
return 'stored'
"""

# promote_summary: the staged summary becomes the shown one (the window has
# dropped what it covers). KEYS: 1 meta hash. ARGV: 1 the staged upto expected.
PROMOTE_SUMMARY_LUA = """
local upto = redis.call('HGET', KEYS[1], 'summary_next_upto')
if upto ~= ARGV[1] then return 0 end
local text = redis.call('HGET', KEYS[1], 'summary_next')
if not text then return 0 end
redis.call('HSET', KEYS[1], 'summary', text, 'summary_upto', upto)
redis.call('HDEL', KEYS[1], 'summary_next', 'summary_next_upto')
return 1
"""

# release_lock: delete the lock only if this fold still holds it.
RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SummaryError(RapportError):
    """A fold produced no usable summary (the engine gave up or wrote nothing)."""


class Summarizer:
    """Folds trimmed turns into each conversation's running summary, in the background.

    Args:
        redis: the process's Redis client (``decode_responses=True``).
        keys: the key layout.
        engine: the engine to generate with (the one user turns use).
        instructions: the summarising instructions ("" for
            :data:`sessions.summary.DEFAULT_INSTRUCTIONS`).
        max_tokens: the longest summary, in tokens.
        metrics: where folds are counted (optional).
        enabled: False makes :meth:`maybe_fold` do nothing.
        lock_ms: how long one process may hold a conversation's fold before
            another may start one (a crashed process's lock expires). A fold
            that outlives it is still safe: the store is compare-and-set.
    """

    def __init__(self, redis: Any, keys: KeySpace, engine: Engine, *, instructions: str, max_tokens: int,
                 metrics: Metrics | None = None, enabled: bool = True, lock_ms: int = 60_000) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.redis = redis
        self.keys = keys
        self.engine = engine
        self.instructions = instructions
        self.max_tokens = int(max_tokens)
        self.metrics = metrics
        self.enabled = enabled
        self.lock_ms = int(lock_ms)
        self._store = redis.register_script(STORE_SUMMARY_LUA)
        self._promote = redis.register_script(PROMOTE_SUMMARY_LUA)
        self._promotions: set[asyncio.Task[None]] = set()
        self._release = redis.register_script(RELEASE_LOCK_LUA)
        # One fold task per conversation in this process: (user, conversation) -> task.
        self._folds: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closed = False

    # ------------------------------------------------------------ interface

    def maybe_fold(self, user_id: str, conversation_id: str, dropped: Sequence[PastTurn],
                   meta: Mapping[str, str], *, ahead: bool = False) -> None:
        """Start folding the dropped turns the summary lacks, if any; returns at once.

        With ``ahead``, ``dropped`` are the turns the *next* turn's window will
        drop, and the result is staged (see :mod:`sessions.summary`). Never
        raises and never blocks: it runs on a user turn's path, before its
        first token. Called on every turn, it also retries a fold that failed
        or was skipped, since the summary's mark then has not moved.
        """
        if not self.enabled or self._closed:
            return
        try:
            turns = turns_to_fold(dropped, meta)
            if not turns:
                return
            key = (user_id, conversation_id)
            running = self._folds.get(key)
            if running is not None and not running.done():
                return
            previous, _, from_staged = shown_summary(meta, dropped)
            task = asyncio.get_running_loop().create_task(
                self._fold(user_id, conversation_id, turns, previous,
                           (meta.get(SUMMARY_UPTO_FIELD, ""), meta.get(SUMMARY_NEXT_UPTO_FIELD, "")),
                           slot="next" if ahead else "shown", from_staged=from_staged),
                name=f"summary fold {conversation_id}",
            )
            self._folds[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        except Exception:
            log.exception("could not schedule a summary fold for a conversation of %s", user_id)

    def promote(self, user_id: str, conversation_id: str, staged_upto: str) -> None:
        """Make the staged summary the shown one, in the background (compare-and-set on its mark)."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._promote_staged(user_id, conversation_id, staged_upto),
                                                      name=f"summary promote {conversation_id}")
        self._promotions.add(task)
        task.add_done_callback(self._promotions.discard)

    async def _promote_staged(self, user_id: str, conversation_id: str, staged_upto: str) -> None:
        try:
            await self._promote(keys=[self.keys.conversation_meta(user_id, conversation_id)], args=[staged_upto])
        except (rexc.RedisError, OSError) as exc:
            # The next turn shows the staged summary all the same and tries again.
            log.warning("staged summary not promoted, Redis failed: %s: %s", type(exc).__name__, exc)

    def pending(self) -> int:
        """Folds running or waiting in this process."""
        return sum(1 for task in self._folds.values() if not task.done())

    async def wait_idle(self) -> None:
        """Wait for every fold started so far (tests, shutdown drains)."""
        while running := [task for task in (*self._folds.values(), *self._promotions) if not task.done()]:
            await asyncio.wait(running)

    async def close(self) -> None:
        """Cancel pending folds (aborting their engine requests) and wait for them to end."""
        self._closed = True
        tasks = [*self._folds.values(), *self._promotions]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._folds.clear()

    # ------------------------------------------------------------ one fold

    def _forget(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._folds.get(key) is task:
            del self._folds[key]

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.summary_fold(outcome)

    async def _fold(self, user_id: str, conversation_id: str, turns: list[PastTurn], previous: str,
                    upto: tuple[str, str], *, slot: str = "shown", from_staged: bool = False) -> None:
        meta_key = self.keys.conversation_meta(user_id, conversation_id)
        lock_key = self.keys.user_key(user_id, "sumlock:" + escape_id(conversation_id))
        token = uuid.uuid4().hex
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(lock_key, token, nx=True, px=self.lock_ms)
            pipe.hget(meta_key, SUMMARY_UPTO_FIELD)
            pipe.hget(meta_key, SUMMARY_NEXT_UPTO_FIELD)
            locked, current, current_next = await pipe.execute()
        except (rexc.RedisError, OSError) as exc:
            log.warning("summary fold skipped, Redis failed: %s: %s", type(exc).__name__, exc)
            self._count("failed")
            return
        if not locked:
            return  # another process folds this conversation now
        try:
            if ((current or ""), (current_next or "")) != upto:
                # Folded by another process since the turn read the summary.
                self._count("lost")
                return
            self._count("started")
            started = time.monotonic()
            try:
                summary = await self._summarise(user_id, previous, turns)
            except (RapportError, rexc.RedisError, OSError) as exc:
                log.warning("summary fold failed: %s: %s", type(exc).__name__, exc)
                self._count("failed")
                return
            finally:
                if self.metrics is not None:
                    self.metrics.summary_engine.observe(time.monotonic() - started)
            try:
                outcome = await self._store(keys=[meta_key, self.keys.history(user_id, conversation_id)],
                                            args=[upto[0], upto[1], summary, fold_mark(turns[-1]), slot,
                                                  "1" if from_staged else "0"])
            except (rexc.RedisError, OSError) as exc:
                log.warning("summary not stored, Redis failed: %s: %s", type(exc).__name__, exc)
                self._count("failed")
                return
            self._count("succeeded" if outcome == "stored" else "lost")
        except Exception:
            log.exception("summary fold crashed")
            self._count("failed")
        finally:
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._release(keys=[lock_key], args=[token])

    async def _summarise(self, user_id: str, previous: str, turns: Sequence[PastTurn]) -> str:
        """The summary with ``turns`` folded in: one engine request per chunk that fits the context."""
        summary = previous
        for chunk in self._chunks(previous, turns):
            summary = await self._generate(user_id, self._messages(summary, chunk))
        return summary

    def _messages(self, previous: str, turns: Sequence[PastTurn]) -> list[ChatMessage]:
        return fold_messages(previous, turns, instructions=self.instructions,
                             max_summary_words=max(1, int(self.max_tokens * WORDS_PER_TOKEN)))

    def _chunks(self, previous: str, turns: Sequence[PastTurn]) -> list[list[PastTurn]]:
        """``turns`` in consecutive groups whose fold prompt fits the model's context.

        The previous summary is taken at its full length for every group (a
        folded one is at most ``max_tokens`` long). A single turn too long for
        any prompt is cut to what fits.
        """
        room = self.engine.max_model_len - self.max_tokens
        stand_in = previous or "x" * (self.max_tokens * 4)
        chunks: list[list[PastTurn]] = []
        current: list[PastTurn] = []
        for turn in turns:
            if self.engine.count_tokens(self._messages(stand_in, [*current, turn])) <= room:
                current.append(turn)
                continue
            if current:
                chunks.append(current)
            current = [turn]
            while (self.engine.count_tokens(self._messages(stand_in, current)) > room
                   and len(current[0].user) + len(current[0].assistant) > 64):
                only = current[0]
                current = [PastTurn(only.user[: len(only.user) * 3 // 4],
                                    only.assistant[: len(only.assistant) * 3 // 4], only.exchange_id)]
        if current:
            chunks.append(current)
        return chunks

    async def _generate(self, user_id: str, messages: list[ChatMessage]) -> str:
        request = EngineRequest(
            request_id="sum_" + uuid.uuid4().hex,
            messages=tuple(messages),
            sampling=SamplingOptions(temperature=SUMMARY_TEMPERATURE, max_tokens=self.max_tokens,
                                     stop=TRANSCRIPT_STOPS),
            user_id=user_id,
            priority=BACKGROUND_PRIORITY,
        )
        parts: list[str] = []
        finish: EngineFinish | None = None
        stream = self.engine.generate(request)
        try:
            async for event in stream:
                if isinstance(event, EngineDelta):
                    parts.append(event.text)
                elif isinstance(event, EngineFinish):
                    finish = event
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        if finish is None or finish.finish_reason not in ("stop", "length"):
            raise SummaryError("the engine gave the summary up")
        text = "".join(parts).strip()
        if finish.finish_reason == "length":
            text = _whole_sentences(text)
        if not text:
            raise SummaryError("the engine wrote an empty summary")
        return text


def _whole_sentences(text: str) -> str:
    """``text`` without a sentence that ``max_tokens`` cut off (kept whole when it is the only one)."""
    end = max(text.rfind(mark) for mark in (".", "!", "?"))
    return text[: end + 1] if end > 0 else text
