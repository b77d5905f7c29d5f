"""Turns generating in this process: the adapter between the pure turn machine, the engine and Redis.

The :class:`TurnManager` owns every turn generating in this process. A turn is
owned here, not by the socket that started it, because a dropped socket is not
a cancel (guarantee 3): the generation task keeps going while followers come
and go, and only the detach timer, a cancel, the hard deadline, the engine or
shutdown end it.

Path of one delta: engine -> :meth:`TurnManager._generate` -> the pure
:class:`~sessions.turn.Turn` numbers it -> pushed to every following
connection's send queue (no await: nothing slow sits between the engine and the
socket) -> appended to the turn's delta log in Redis by the process's
:class:`~server.delta_log.DeltaLogWriter`.

Everything that can end a turn from outside its engine stream -- ``turn.cancel``
(from a socket here or from another process), the hard-deadline timer, the
detach timer, shutdown -- is fed to the pure turn as an interruption
(:meth:`~sessions.turn.Turn.interrupt`), whose table decides whether it still
applies. When it ends the turn, the manager cancels the generation task, which
closes the engine's iterator (aborting the request) and carries the ending out:
the end entry in Redis, ``turn.end`` to every follower, the lease released.

Turns generating in other processes are followed and cancelled through Redis
by :class:`~server.following.DistantTurns`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, cast

from protocol import frames
from protocol.errors import BadRequest, EngineError, NotFound, RapportError, TurnInProgress, Unavailable
from sessions.characters import Character, Persona, apply_macros, greeting_of, persona_of
from sessions.exchanges import find_exchange, model_view, newest_exchange
from sessions.lorebook import lore_block
from sessions.memory import FactStore, facts_block, parse_facts
from sessions.messages import ChatMessage
from sessions.moderation import OutputFilter
from sessions.prompt import TRIM_BLOCK, Context, PastTurn, Window, first_kept_turn, pair_history, plan_window
from sessions.store import MAX_ALTERNATIVES, RETRY_AFTER_MS, ConversationStore, HistoryMessage, TurnRecord
from sessions.summary import shown_summary, summary_block
from sessions.training import Alternative, ExchangeSnapshot
from sessions.turn import ENGINE_FINISH_REASONS, Attachment, AttachmentState, Ending, Turn, TurnEvent, Usage

from .coordination import Coordinator, end_orphaned_turn, wall_ms
from .delta_log import DeltaLogWriter
from .engines.base import Engine, EngineDelta, EngineEvent, EngineFinish, EngineRequest, SamplingOptions
from .following import DistantTurns, Follower, end_frame_of
from .metrics import Metrics
from .moderation import Moderation
from .summaries import Summarizer

log = logging.getLogger("rapport.turns")


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    system_prompt: str
    max_history_turns: int
    detached_grace_ms: float
    hard_deadline_ms: float
    ttft_budget_ms: float
    default_max_tokens: int
    max_tokens_limit: int
    default_temperature: float
    # At shutdown, how long to keep retrying Redis writes (deltas, ends) before
    # leaving the turns to the process that reaps their leases. While the
    # process runs they are retried for as long as Redis is away.
    store_retry_s: float = 30.0
    remote_follow_block_ms: int = 5000


def now_ms() -> float:
    return time.monotonic() * 1000.0


def _counted_turns(meta: dict[str, str]) -> int:
    """The conversation's turns as the store counts them (0 for conversations from before the count)."""
    raw = meta.get("turns", "")
    return int(raw) if raw.isdigit() else 0


#: Where :meth:`TurnManager._past_and_lease` puts the pinned facts' prompt block
#: among the conversation's meta fields (no Redis field has this name).
FACTS_FIELD = "\x00facts"

#: ``{{user}}`` in a character's text when the caller's token names nobody.
DEFAULT_USER_NAME = "User"


class CharacterSource(Protocol):
    """Where the manager looks characters up (``server.characters.CharacterCatalog``)."""

    async def get(self, character_id: str) -> Character | None: ...


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """What ``turn.start``, ``turn.regenerate`` and ``turn.edit`` ask for, in one shape."""

    kind: Literal["new", "regenerate", "edit"]
    client_turn_id: str
    conversation_id: str
    options: frames.TurnOptions
    text: str | None = None  # None: regenerate (the exchange's own user text)
    exchange_id: str | None = None  # regenerate / edit: the newest exchange (None: whichever it is)
    character_id: str | None = None

    @classmethod
    def of(cls, frame: frames.TurnStart | frames.TurnRegenerate | frames.TurnEdit) -> TurnRequest:
        match frame:
            case frames.TurnStart():
                return cls("new", frame.client_turn_id, frame.conversation_id, frame.options,
                           text=frame.text, character_id=frame.character_id)
            case frames.TurnRegenerate():
                return cls("regenerate", frame.client_turn_id, frame.conversation_id, frame.options,
                           exchange_id=frame.exchange_id)
            case frames.TurnEdit():
                return cls("edit", frame.client_turn_id, frame.conversation_id, frame.options,
                           text=frame.text, exchange_id=frame.exchange_id)


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """What the manager tells its end observers once a turn's end is stored."""

    user_id: str
    conversation_id: str
    turn_id: str
    finish_reason: str
    text: str
    #: Whether a socket (here or in another process) followed the turn when it ended.
    followed: bool


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What a turn will generate from, decided before it is accepted."""

    messages: list[ChatMessage]
    sampling: SamplingOptions
    exchange_id: str  # "" for a new exchange (the turn's own id)
    bind_character: str  # the character to bind or check in Redis, "" none
    greeting: str  # stored when this turn binds the conversation
    lora: str | None


@dataclass(eq=False, slots=True)
class LiveTurn:
    """A turn generating in this process."""

    user_id: str
    conversation_id: str
    client_turn_id: str
    machine: Turn
    attachment: Attachment
    messages: list[ChatMessage]
    sampling: SamplingOptions
    followers: set[Follower] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    # Set by the task's first step. Cancelling a task before that would skip its
    # body, and with it the carrying out of the ending that cancelled it.
    generating: bool = False
    detach_timer: asyncio.TimerHandle | None = None
    deadline_timer: asyncio.TimerHandle | None = None
    end_frame: dict[str, Any] | None = None
    last_delta_ms: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The reply's moderation filter: engine text goes through it before the turn sees it.
    output_filter: OutputFilter | None = None
    # The LoRA adapter of the conversation's character, if it names one.
    lora: str | None = None

    @property
    def turn_id(self) -> str:
        return self.machine.turn_id


class TurnManager:
    def __init__(self, *, store: ConversationStore, engine: Engine, policy: TurnPolicy,
                 metrics: Metrics | None = None, owner: str | None = None,
                 moderation: Moderation | None = None) -> None:
        self.store = store
        # Replies pass its output filter; None (or a policy-less one): no moderation.
        self.moderation = moderation if moderation is not None else Moderation(None)
        self.metrics = metrics
        self.engine = engine
        self.policy = policy
        self.owner = owner or uuid.uuid4().hex[:12]
        self.live: dict[str, LiveTurn] = {}
        self.writer = DeltaLogWriter(store, policy.store_retry_s)
        self.distant = DistantTurns(store, block_ms=policy.remote_follow_block_ms)
        self._closing = False
        # Set when shutdown stops waiting for Redis: the retry loops give up.
        self._abandon = asyncio.Event()
        # Tasks settling turn starts whose answer from Redis was lost (see start()).
        self._settling: set[asyncio.Task[None]] = set()
        # Set by the runtime: leases and control messages across processes.
        self.coordinator: Coordinator | None = None
        # Told the completion tokens of every naturally finished turn (admission learns from it).
        self.reply_observer: Callable[[int], None] | None = None
        # Set by the runtime: the characters conversations are bound to, the
        # users' pinned facts, and the summarizer of trimmed turns.
        self.characters: CharacterSource | None = None
        self.facts: FactStore | None = None
        self.summarizer: Summarizer | None = None
        # Told about every turn whose end was stored (webhooks for detached
        # completions); called without awaiting, so it must not block.
        self.end_observers: list[Callable[[TurnEnded], None]] = []

    def live_turns(self) -> list[tuple[str, str]]:
        """(user, turn) of every turn generating here, for lease renewal."""
        return [(live.user_id, turn_id) for turn_id, live in self.live.items()]

    # ------------------------------------------------------------ starting

    def sampling_for(self, options: frames.TurnOptions, character: Character | None = None) -> SamplingOptions:
        """The turn's options, else the character's defaults, else the server's."""
        p = self.policy
        defaults = character.sampling if character is not None else None
        temperature = options.temperature
        top_p = options.top_p
        max_tokens = options.max_tokens
        if defaults is not None:
            temperature = defaults.temperature if temperature is None else temperature
            top_p = defaults.top_p if top_p is None else top_p
            max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
        return SamplingOptions(
            temperature=p.default_temperature if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            max_tokens=max(1, min(max_tokens or p.default_max_tokens, p.max_tokens_limit)),
            enable_thinking=bool(options.enable_thinking),
        )

    async def character(self, character_id: str) -> Character:
        """The character ``character_id``; NotFound when there is none (or no catalog)."""
        found = await self.characters.get(character_id) if self.characters is not None else None
        if found is None:
            raise NotFound(f"character '{character_id}' not found")
        return found

    def persona(self, character: Character | None, user_name: str) -> Persona | None:
        if character is None:
            return None
        return persona_of(character, default_system_prompt=self.policy.system_prompt, user_name=user_name)

    async def start(self, follower: Follower,
                    start: frames.TurnStart | frames.TurnRegenerate | frames.TurnEdit | TurnRequest,
                    received_ms: float, *, user_name: str = DEFAULT_USER_NAME) -> str:
        """Handle ``turn.start`` (or ``turn.regenerate``, ``turn.edit``): accept (or
        replay) and stream to ``follower``; the turn id.

        Raises TurnInProgress, TooLarge, Unavailable before anything is sent.
        The reply passes the moderation policy's output filter (the caller has
        checked the message itself, and admitted the turn: rate limit and
        admission control are one round trip before this one).

        Redis round trips here before the engine sees the prompt: two. The
        first reads the history and takes the lease in one pipeline; the second
        is the ``begin_turn`` script.
        """
        if self._closing:
            raise Unavailable("the server is shutting down; reconnect", retry_after_ms=RETRY_AFTER_MS)
        request = start if isinstance(start, TurnRequest) else TurnRequest.of(start)
        user_id = follower.user_id
        turn_id = "t_" + uuid.uuid4().hex
        # The lease exists before the turn does (it travels in the first round
        # trip, the turn is only accepted in the second), so a crash at any
        # point after the accept leaves a lease that some process will reap. A
        # lease whose turn never comes to exist is harmless: released below,
        # or reaped by a process that then finds no record.
        past_reads = self._past_and_lease(user_id, request, turn_id)
        try:
            past, meta = await past_reads
            # The window is computed before the turn is accepted so that a
            # message the model cannot take is refused (too_large) without
            # touching history.
            plan = await self._plan(user_id, request, past, meta, user_name)
        except Exception:
            # Refused (or Redis failed) before the turn exists. A cancelled
            # start leaves its lease to the reaper, which finds no record.
            await self._release_lease(user_id, turn_id)
            raise
        try:
            outcome = await self.store.begin_turn(
                user_id=user_id,
                conversation_id=request.conversation_id,
                client_turn_id=request.client_turn_id,
                text=request.text or "",
                turn_id=turn_id,
                owner=self.owner,
                now_ms=wall_ms(),
                mode=request.kind,
                exchange_id=plan.exchange_id,
                character_id=plan.bind_character,
                greeting=plan.greeting,
            )
        except Unavailable:
            # The script may have run with only its answer lost (a connection
            # dropped or timed out on the way back). Such a turn would hold its
            # conversation (turn_in_progress) until its lease is reaped, a
            # lease after Redis is back; it is settled as soon as Redis answers.
            self._settle_later(user_id, turn_id)
            raise
        if outcome.kind != "accepted" and self.coordinator is not None:
            await self._release_lease(user_id, turn_id)
        if outcome.kind == "in_progress":
            raise TurnInProgress(
                f"conversation '{request.conversation_id}' already has a running turn",
                client_turn_id=request.client_turn_id,
                turn_id=outcome.running_turn_id,
            )
        record = outcome.turn
        assert record is not None
        accepted = frames.turn_accepted(
            turn_id=record.turn_id,
            client_turn_id=request.client_turn_id,
            conversation_id=record.conversation_id,
            replayed=outcome.kind == "replayed",
            exchange_id=record.exchange_id or record.turn_id,
            alternative=outcome.alternative,
        )
        if outcome.kind == "replayed":
            follower.push(accepted)
            task = await self.follow(follower, record.turn_id, 0, replay=True)
            if task is not None:
                follower.adopt(record.turn_id, task)
            return record.turn_id
        live = LiveTurn(
            user_id=user_id,
            conversation_id=request.conversation_id,
            client_turn_id=request.client_turn_id,
            machine=Turn(turn_id=record.turn_id, received_ms=received_ms),
            attachment=Attachment(grace_ms=self.policy.detached_grace_ms),
            messages=plan.messages,
            sampling=plan.sampling,
            output_filter=self.moderation.output_filter(),
            lora=plan.lora,
        )
        live.followers.add(follower)
        self.live[record.turn_id] = live
        follower.push(accepted)
        loop = asyncio.get_running_loop()
        live.deadline_timer = loop.call_later(self.policy.hard_deadline_ms / 1000.0,
                                              self._deadline_passed, live)
        live.task = loop.create_task(self._generate(live), name=f"turn {record.turn_id}")
        return record.turn_id

    async def _past_and_lease(self, user_id: str, request: TurnRequest,
                              turn_id: str) -> tuple[list[HistoryMessage], dict[str, str]]:
        """The newest history of the conversation, its meta (binding, selections,
        summary), the user's pinned facts (into ``meta``, see :data:`FACTS_FIELD`),
        and the new turn's lease, in one round trip."""
        p = self.policy
        leases = self.coordinator.leases if self.coordinator is not None else None
        facts = self.facts

        def also(pipe: Any) -> None:
            if facts is not None:
                facts.queue_read(pipe, user_id)
            if leases is not None:
                leases.queue_take(pipe, user_id, turn_id)

        # Two messages a turn, plus slack for a trailing unanswered message and
        # a few alternatives; regenerate and edit need the whole newest exchange.
        slack = 8 if request.kind == "new" else MAX_ALTERNATIVES + 1
        limit = min(self.store.history_max_messages, 2 * max(0, p.max_history_turns) + 2 + slack)
        past, meta, extra = await self.store.history_with(
            user_id=user_id, conversation_id=request.conversation_id, limit=limit, also=also)
        if facts is not None:
            meta[FACTS_FIELD] = facts_block(parse_facts(extra[0]))
        return past, meta

    async def _plan(self, user_id: str, request: TurnRequest, past: list[HistoryMessage],
                    meta: dict[str, str], user_name: str) -> TurnPlan:
        """Character, window, sampling and exchange of a turn about to be accepted.

        Every check made here is made again atomically by ``begin_turn``; these
        refuse early (and cheaply) what would certainly be refused there.
        """
        bound = meta.get("character_id") or None
        if request.character_id and bound and request.character_id != bound:
            raise BadRequest(f"conversation '{request.conversation_id}' is bound to character '{bound}'")
        character_id = bound or request.character_id
        character = await self.character(character_id) if character_id else None
        binding = character is not None and bound is None
        greeting = ""
        if binding:
            if past:
                raise BadRequest(f"conversation '{request.conversation_id}' already has history without a "
                                 "character; start a new conversation to talk to one")
            assert character is not None
            greeting = greeting_of(character, 0, user_name=user_name)
        if character is not None:
            # An adapter the engine does not have is the card's mistake: refused
            # before the turn exists, not an engine failure halfway through it.
            self.engine.check_lora(character.lora)
        sampling = self.sampling_for(request.options, character)
        exchange_id = ""
        if request.kind == "new":
            view = model_view(past, meta)
            text = request.text or ""
        else:
            newest = newest_exchange(past)
            wanted = request.exchange_id or newest
            if wanted is None or wanted != newest:
                raise BadRequest("only the newest exchange can be regenerated or edited"
                                 + (f" (it is '{newest}')" if newest else "; the conversation has none"))
            found = find_exchange(past, meta, wanted)
            assert found is not None
            exchange_id = wanted
            view = found.before
            text = found.user_text if request.kind == "regenerate" else (request.text or "")
        if request.kind == "regenerate" and sampling.temperature > 0 and sampling.seed is None:
            # Another reply to the same prompt must be able to differ: a fresh
            # seed (what an unseeded sampler does anyway) also makes seeded
            # engines, such as the simulation, answer differently.
            sampling = replace(sampling, seed=secrets.randbits(31))
        history = pair_history(view)
        if greeting:
            history = [PastTurn("", greeting)]
        # How many turns came before what was read (the store counts them), so
        # the window trims by position in the whole conversation.
        whole = _counted_turns(meta) - (0 if request.kind == "new" else 1)
        offset = max(0, whole - len(history))
        # The turns the turn cap drops (the token budget may drop more): they
        # decide whether the summary folded ahead for this trim is shown now.
        capped = history[:self._cap_start(whole, offset, len(history))]
        window = self._window(history, text, sampling,
                              self._context(character, user_name, meta, history, text, capped),
                              history_offset=offset)
        if self.summarizer is not None:
            self._fold_summary(user_id, request.conversation_id, meta, history, capped,
                               history[:window.first_kept], self._cap_start(whole + 1, offset, len(history)))
        return TurnPlan(messages=window.messages, sampling=sampling, exchange_id=exchange_id,
                        bind_character=character_id or "", greeting=greeting,
                        lora=character.lora if character is not None else None)

    def _cap_start(self, whole: int, offset: int, read: int) -> int:
        """Where the turn cap starts the window among the ``read`` turns (``offset`` came before them)."""
        first = first_kept_turn(whole, self.policy.max_history_turns, TRIM_BLOCK) - offset
        return min(read, max(0, first))

    def _fold_summary(self, user_id: str, conversation_id: str, meta: dict[str, str], history: list[PastTurn],
                      capped: list[PastTurn], dropped: list[PastTurn], next_start: int) -> None:
        """Keep the conversation's summary in step with the window, in the background.

        The summary staged ahead for this trim is promoted once shown; turns the
        window drops that no summary covers are folded now (shown from the next
        turn); and when the next turn's window will drop more turns under the
        turn cap, those are folded ahead (staged), so that the summary changes
        on the turn that trims and on no other (sessions.summary).
        """
        assert self.summarizer is not None
        _, staged_upto, staged = shown_summary(meta, capped)
        if staged:
            self.summarizer.promote(user_id, conversation_id, staged_upto)
        if dropped:
            self.summarizer.maybe_fold(user_id, conversation_id, dropped, meta)
        if next_start > len(capped):
            self.summarizer.maybe_fold(user_id, conversation_id, history[:next_start], meta, ahead=True)

    def _context(self, character: Character | None, user_name: str, meta: dict[str, str],
                 history: list[PastTurn], text: str, capped: list[PastTurn] | None = None) -> Context:
        """Everything the model sees besides the turns (see :class:`sessions.prompt.Context`);
        ``capped`` are the turns the turn cap leaves out (which summary is shown)."""
        persona = self.persona(character, user_name)
        memory = "\n\n".join(part for part in (meta.get(FACTS_FIELD, ""), summary_block(meta, capped or ()))
                               if part)
        lore = ""
        if character is not None and character.character_book:
            recent = [part for turn in history for part in (turn.user, turn.assistant) if part] + [text]
            lore = apply_macros(lore_block(character.character_book, recent, count_tokens=self._count_text),
                                char=character.name, user=user_name)
        return Context(
            system=persona.system if persona is not None else self.policy.system_prompt,
            memory=memory,
            lore=lore,
            post_history=persona.post_history if persona is not None else "",
        )

    def _count_text(self, text: str) -> int:
        return self.engine.count_tokens([ChatMessage("user", text)])

    def _window(self, history: list[PastTurn], text: str, sampling: SamplingOptions,
                context: Context, history_offset: int = 0) -> Window:
        p = self.policy
        max_prompt = self.engine.max_model_len - sampling.max_tokens
        return plan_window(
            system_prompt=context,
            history=history,
            new_text=text,
            max_history_turns=p.max_history_turns,
            max_prompt_tokens=max(1, max_prompt),
            count_tokens=self.engine.count_tokens,
            history_offset=history_offset,
        )

    async def select(self, user_id: str, conversation_id: str, turn_id: str) -> str:
        """``turn.select``: make the reply ``turn_id`` the one the model sees; its exchange id."""
        record = await self.store.get_turn(user_id=user_id, turn_id=turn_id)
        if record is not None and record.status == "running":
            raise BadRequest("the reply is still being generated; select it once it has ended", turn_id=turn_id)
        return await self.store.select_alternative(user_id=user_id, conversation_id=conversation_id,
                                                   turn_id=turn_id)

    async def exchange_snapshot(self, user_id: str, turn_id: str) -> ExchangeSnapshot:
        """The exchange the reply ``turn_id`` belongs to, as training data keeps it.

        The prompt is rebuilt the way a turn builds it (persona, window, post-history
        instructions), from the history before the exchange. Raises NotFound when
        the turn's record has expired (the idempotency period) or its exchange
        has left history, BadRequest while the reply is still generating.
        """
        record = await self.store.get_turn(user_id=user_id, turn_id=turn_id)
        if record is None:
            raise NotFound("turn not found", turn_id=turn_id)
        if record.status == "running":
            raise BadRequest("the reply is still being generated", turn_id=turn_id)
        past, meta = await self.store.history_and_meta(user_id=user_id, conversation_id=record.conversation_id,
                                                       limit=self.store.history_max_messages)
        exchange_id = record.exchange_id or record.turn_id
        found = find_exchange(past, meta, exchange_id)
        if found is None:
            raise NotFound("the rated reply's message is no longer in history", turn_id=turn_id)
        character_id = meta.get("character_id") or None
        character = await self.characters.get(character_id) \
            if character_id and self.characters is not None else None
        sampling = self.sampling_for(frames.TurnOptions(), character)
        if self.facts is not None:
            meta[FACTS_FIELD] = facts_block(await self.facts.list(user_id))
        history = pair_history(found.before)
        messages = self._window(history, found.user_text, sampling,
                                self._context(character, DEFAULT_USER_NAME, meta, history, found.user_text)).messages
        return ExchangeSnapshot(
            user_id=user_id,
            conversation_id=record.conversation_id,
            exchange_id=exchange_id,
            character_id=character_id,
            prompt=tuple(messages),
            alternatives=tuple(Alternative(turn_id=t, text=text, finish_reason=status)
                               for t, text, status in found.replies),
            selected=found.selected,
        )

    # ------------------------------------------------------------ generating

    async def _generate(self, live: LiveTurn) -> None:
        turn = live.machine
        live.generating = True
        if turn.ending is None:  # else an interruption came before this first step
            try:
                await self._stream(live)
            except asyncio.CancelledError:
                if turn.ending is None:
                    # Not one of our interruptions (they end the turn before they
                    # cancel): shutdown. close() or the lease logic ends the turn.
                    raise
            # The engine stream is closed by now: these only end the turn.
            except EngineError as exc:
                log.warning("turn %s: engine failed: %s", turn.turn_id, exc)
                self._interruption(live, TurnEvent.ENGINE_FAILED)
            except Exception:
                log.exception("turn %s: unexpected error", turn.turn_id)
                self._interruption(live, TurnEvent.INTERNAL_ERROR)
        assert turn.ending is not None
        await self._finish(live, turn.ending)

    async def _stream(self, live: LiveTurn) -> None:
        """Feed the engine's output to the turn until the engine stops."""
        turn = live.machine
        finish: EngineFinish | None = None
        request = EngineRequest(request_id=turn.turn_id, messages=tuple(live.messages),
                                sampling=live.sampling, user_id=live.user_id, lora=live.lora)
        turn.submitted(now_ms())
        # Typed as an iterator, but every engine returns an async generator,
        # whose aclose() aborts the request (see server.engines.base).
        stream = cast(AsyncGenerator[EngineEvent, None], self.engine.generate(request))
        async with contextlib.aclosing(stream):  # closing aborts the engine request
            async for event in stream:
                if isinstance(event, EngineDelta):
                    if not self._take(live, event.text, event.tokens):
                        return  # blocked: leaving the block aborts the engine request
                else:
                    finish = event
                    break
        if finish is not None and not self._take(live, None, 0):
            return  # the held-back tail was blocked
        if finish is None:
            turn.engine_stopped(None, self._partial_usage(live), now_ms())
            return
        ending = turn.engine_stopped(finish.finish_reason, Usage(
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            cached_prompt_tokens=finish.cached_prompt_tokens,
        ), now_ms())
        if ending.finish_reason in ENGINE_FINISH_REASONS:
            if finish.engine_ttft_ms is not None:
                # The engine's own share of ttft_ms (an additive timings field).
                ending.timings["engine_ttft_ms"] = round(finish.engine_ttft_ms, 3)
            if self.reply_observer is not None:
                self.reply_observer(finish.completion_tokens)

    def _take(self, live: LiveTurn, text: str | None, tokens: int) -> bool:
        """Engine text through the output filter to the turn and its followers
        (``None``: the engine finished, release what is held if clean). False when
        the filter blocked the reply, which has then ended ``content_filter``.

        Only released text reaches the turn, so the followers, the delta log and
        the stored reply all hold exactly what the user saw.
        """
        turn = live.machine
        blocked = False
        if live.output_filter is not None:
            text, blocked = (live.output_filter.finish() if text is None
                             else live.output_filter.feed(text))
        if text is not None:
            t = now_ms()
            out = turn.delta(text, tokens, t)
            if out is not None:
                self._emit(live, out.seq, out.text, t)
        if blocked:
            turn.content_filtered(now_ms(), self._partial_usage(live))
            self.moderation.record_block(user_id=live.user_id, turn_id=live.turn_id, direction="output")
        return not blocked

    def _partial_usage(self, live: LiveTurn) -> Usage:
        return Usage(prompt_tokens=self.engine.count_tokens(live.messages),
                     completion_tokens=live.machine.completion_tokens)

    def _emit(self, live: LiveTurn, seq: int, text: str, t: float) -> None:
        """One numbered delta (released at ``t``, the turn's clock) to every follower and the delta log.

        Once per delta per turn: the frame is built once and shared by every
        follower's outbox (an outbox that merges copies it first).
        """
        if live.deadline_timer is not None:
            live.deadline_timer.cancel()
            live.deadline_timer = None
        if self.metrics is not None:
            if live.last_delta_ms is not None:
                self.metrics.delta_gap((t - live.last_delta_ms) / 1000.0)
            live.last_delta_ms = t
        frame = frames.turn_delta(live.turn_id, seq, text)
        for follower in tuple(live.followers):
            follower.push(frame, live=True)
        self.writer.add(live.user_id, live.turn_id, seq, text)

    async def _finish(self, live: LiveTurn, ending: Ending) -> None:
        """Store the turn's end, then tell its followers what history now holds.

        The end is stored only behind every delta (guarantee 2) and sent only
        once stored, so no client is told a different story than history
        keeps. While Redis is away both are retried for as long as it takes,
        holding ``turn.end``: the turn stays in ``self.live``, so its lease is
        renewed as soon as Redis answers and no other process reaps it meanwhile
        (they reap only after a whole lease of healthy Redis). Only shutdown
        gives up; then nothing is sent, the sockets close 1001, and whoever
        reaps the lease ends the turn with what its log holds.
        """
        for timer in (live.deadline_timer, live.detach_timer):
            if timer is not None:
                timer.cancel()
        ours = frames.turn_end(turn_id=live.turn_id, seq=ending.seq, finish_reason=ending.finish_reason,
                               text=ending.text, usage=ending.usage.as_dict(), timings=ending.timings)
        # Stays None unless stored: an end never stored is never sent.
        end: dict[str, Any] | None = None
        try:
            end = await self._store_end(live, ending, ours)
        finally:
            live.end_frame = end
            self.writer.forget(live.user_id, live.turn_id)
            if self.metrics is not None:
                self.metrics.turn_ended(ending.finish_reason, ending.timings, ending.usage.as_dict(),
                                        self.policy.ttft_budget_ms)
            if end is not None:
                for follower in tuple(live.followers):
                    follower.push(end)
                self._tell_end_observers(live, ending)
            live.followers.clear()
            live.done.set()
            self.live.pop(live.turn_id, None)
            if end is not None:
                # Given up at shutdown, the lease stays: its expiry is what
                # makes another process end the turn.
                await self._release_lease(live.user_id, live.turn_id)

    def _tell_end_observers(self, live: LiveTurn, ending: Ending) -> None:
        notice = TurnEnded(user_id=live.user_id, conversation_id=live.conversation_id, turn_id=live.turn_id,
                           finish_reason=ending.finish_reason, text=ending.text,
                           followed=live.attachment.state is AttachmentState.ATTACHED)
        for observer in self.end_observers:
            try:
                observer(notice)
            except Exception:
                # An observer's bug must not keep the turn from ending for its followers.
                log.exception("turn %s: an end observer failed", live.turn_id)

    async def _release_lease(self, user_id: str, turn_id: str) -> None:
        if self.coordinator is None:
            return
        try:
            await self.coordinator.leases.release(user_id, turn_id)
        except Unavailable:
            # An unreleased lease expires; the reaper then finds the turn ended and skips it.
            log.warning("turn %s: could not release its lease", turn_id)

    async def _store_end(self, live: LiveTurn, ending: Ending, end: dict[str, Any]) -> dict[str, Any] | None:
        """Store the end; the ``turn.end`` history agrees with, or None when given up at shutdown."""
        if await self.writer.drain(live.user_id, live.turn_id):
            async def attempt() -> TurnRecord:
                return await self.store.finish_turn(
                    user_id=live.user_id, turn_id=live.turn_id, finish_reason=ending.finish_reason,
                    text=ending.text, usage=ending.usage.as_dict(), timings=ending.timings,
                    end=end, now_ms=wall_ms(),
                )
        elif self._abandon.is_set():
            return None
        else:
            # Some deltas will never be in the log (not an outage: those are
            # retried). The end must match what the log holds, so the turn
            # ends interrupted with the logged text, as a reaper would end it.
            async def attempt() -> TurnRecord:
                record = await self.store.get_turn(user_id=live.user_id, turn_id=live.turn_id)
                if record is None:
                    raise NotFound("turn not found", turn_id=live.turn_id)
                return await end_orphaned_turn(self.store, record, "interrupted")
        try:
            stored = await self._until_stored(live.turn_id, attempt)
        except NotFound:
            return end  # the user was deleted meanwhile: no history to disagree with
        except RapportError as exc:
            log.error("turn %s: could not store its end: %s", live.turn_id, exc)
            return end
        if stored is None:
            return None
        if stored.finish_reason == ending.finish_reason and stored.text == ending.text:
            return end
        # Another process ended the turn first (it reaped the lease of a process
        # cut off from Redis while Redis answered others): its end is history's.
        log.warning("turn %s: ended elsewhere as %s; sending that end", live.turn_id, stored.finish_reason)
        return end_frame_of(stored)

    async def _until_stored(self, turn_id: str, attempt: Callable[[], Awaitable[TurnRecord]]) -> TurnRecord | None:
        """Run ``attempt`` until Redis answers (None once shutdown gives up).

        Not bounded in time: a turn waiting here holds only its memory, and
        giving up would leave history to say something its client was not told.
        """
        delay = 0.05
        while True:
            try:
                return await attempt()
            except Unavailable:
                if self._abandon.is_set():
                    log.error("turn %s: could not store its end; Redis unreachable at shutdown", turn_id)
                    return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._abandon.wait()
            delay = min(delay * 2, 1.0)

    def _settle_later(self, user_id: str, turn_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._settle_lost_start(user_id, turn_id),
                                                      name=f"settle {turn_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_lost_start(self, user_id: str, turn_id: str) -> None:
        """End a turn whose accept Redis performed but whose answer was lost.

        Its client was told ``unavailable``; the turn never generated. It ends
        ``interrupted`` with no text, which is what a replay of its
        ``client_turn_id`` then answers, and its conversation is free again.
        """
        async def attempt() -> TurnRecord:
            record = await self.store.get_turn(user_id=user_id, turn_id=turn_id)
            if record is None or record.status != "running" or record.owner != self.owner:
                raise NotFound("not started", turn_id=turn_id)
            return await end_orphaned_turn(self.store, record, "interrupted")

        try:
            if await self._until_stored(turn_id, attempt) is not None:
                log.warning("turn %s: accepted by Redis while its client was told unavailable; "
                            "ended interrupted", turn_id)
        except NotFound:
            pass  # the accept never happened: nothing to settle
        except RapportError as exc:
            log.error("turn %s: could not settle a lost accept: %s", turn_id, exc)
        if not self._abandon.is_set():
            await self._release_lease(user_id, turn_id)

    # ------------------------------------------------------------ interrupting

    def _interruption(self, live: LiveTurn, event: TurnEvent) -> Ending | None:
        """Feed an event from outside the engine stream to the turn: its ending, if it ended it."""
        return live.machine.interrupt(event, now_ms(), self._partial_usage(live),
                                      attachment=live.attachment.state)

    def _interrupt(self, live: LiveTurn, event: TurnEvent) -> Ending | None:
        """An interruption while the engine may be generating: abort it if the turn ended."""
        ending = self._interruption(live, event)
        if ending is not None and live.generating and live.task is not None:
            # Cancelling closes the engine's iterator, which aborts the request;
            # the task then carries the ending out.
            live.task.cancel()
        return ending

    def _deadline_passed(self, live: LiveTurn) -> None:
        live.deadline_timer = None
        self._interrupt(live, TurnEvent.DEADLINE)

    def _detach_expired(self, live: LiveTurn) -> None:
        live.detach_timer = None
        if self._interrupt(live, TurnEvent.DETACH_EXPIRED) is not None:
            log.info("turn %s: nobody resumed it within the grace period", live.turn_id)

    async def cancel(self, follower: Follower, turn_id: str) -> None:
        """``turn.cancel``: abort at once; the follower gets the turn's end."""
        live = self.live.get(turn_id)
        if live is not None and live.user_id == follower.user_id:
            if follower not in live.followers:
                self._join(live, follower)
            self._interrupt(live, TurnEvent.CANCEL)
            return
        await self.distant.cancel(follower, turn_id, self.coordinator)

    def on_control(self, op: str, user_id: str, turn_id: str) -> None:
        """A control message from another process about a turn we own."""
        live = self.live.get(turn_id)
        if live is None or live.user_id != user_id:
            return
        if op == "cancel":
            self._interrupt(live, TurnEvent.CANCEL)
        elif op == "attach":
            live.attachment.join()
            if live.detach_timer is not None:
                live.detach_timer.cancel()
                live.detach_timer = None
        elif op == "detach" and live.attachment.followers > 0:
            self._left(live)

    # ------------------------------------------------------------ following

    def _join(self, live: LiveTurn, follower: Follower) -> None:
        live.followers.add(follower)
        live.attachment.join()
        if live.detach_timer is not None:
            live.detach_timer.cancel()
            live.detach_timer = None

    def leave(self, follower: Follower, turn_id: str) -> None:
        """A follower's socket went away; a turn nobody follows starts its grace period."""
        live = self.live.get(turn_id)
        if live is None or follower not in live.followers:
            return
        live.followers.discard(follower)
        self._left(live)

    def _left(self, live: LiveTurn) -> None:
        deadline = live.attachment.leave(now_ms())
        if deadline is not None and live.machine.would_end(TurnEvent.DETACH_EXPIRED, AttachmentState.DETACHED):
            live.detach_timer = asyncio.get_running_loop().call_later(
                self.policy.detached_grace_ms / 1000.0, self._detach_expired, live)

    async def follow(self, follower: Follower, turn_id: str, after_seq: int, *,
                     replay: bool = False) -> asyncio.Task[None] | None:
        """Send the deltas after ``after_seq``, then live ones, then the end.

        Returns a task when the turn runs in another process and is followed
        through its Redis delta log; the caller owns that task.
        """
        live = self.live.get(turn_id)
        if live is not None and live.user_id == follower.user_id:
            # No await between the backlog and joining: no delta can slip between.
            for out in live.machine.deltas_after(after_seq):
                follower.push(frames.turn_delta(turn_id, out.seq, out.text))
            if live.end_frame is not None:
                follower.push(live.end_frame)
            elif follower not in live.followers:
                self._join(live, follower)
            return None
        return await self.distant.resume(follower, turn_id, after_seq, self.coordinator, replay=replay)

    async def active_turns(self, user_id: str) -> list[dict[str, Any]]:
        records = await self.store.active_turns(user_id=user_id)
        out = []
        for r in records:
            live = self.live.get(r.turn_id)
            last = live.machine.seq if live is not None else r.last_seq
            out.append({"turn_id": r.turn_id, "conversation_id": r.conversation_id, "last_seq": last})
        return out

    # ------------------------------------------------------------ shutdown

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop taking turns; let running ones finish for up to ``drain_s``, then
        end the rest ``interrupted`` and store their partial replies."""
        self._closing = True
        if self.live and drain_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await asyncio.gather(*(live.done.wait() for live in self.live.values()))
        for live in list(self.live.values()):
            # The engine is going away under the turns still running: they end interrupted.
            self._interrupt(live, TurnEvent.ENGINE_FAILED)
        pending = [live.task for live in self.live.values() if live.task is not None]
        pending += self._settling
        if pending:
            # Their ends (and deltas) wait for Redis; if it stays away, give
            # them up and leave the turns to the reaping of their leases.
            _, waiting = await asyncio.wait(pending, timeout=self.policy.store_retry_s)
            if waiting:
                log.error("shutdown: %d turn(s) could not store their ends; leaving them to lease reaping",
                          len(waiting))
                self._abandon.set()
                self.writer.abandon()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.writer.close()
