"""A *timing simulation* of a vLLM-style engine with continuous batching.

:class:`SimulatedEngine` is **not a model**. It produces deterministic filler
words on the schedule a continuously batching engine would follow, so the
gateway, admission control and load tests can be exercised without a GPU. The
text means nothing; the timing is the point.

Timing model (all in milliseconds, ``n`` = sequences in the step's batch)::

    step = itl_ms * (1 + batch_slowdown * (n - 1))            # decode, every step
         + (ttft_ms - itl_ms)                                  # only if the step admits
         + prefill_ms_per_token * uncached_prompt_tokens       #   new sequences

One step-loop task runs the scheduler. At the start of each step it moves
requests from the waiting queue into free batch slots (at most
``max_num_seqs`` running) in order of ``EngineRequest.priority`` (lower
first, like vLLM's ``priority`` policy; arrival order among equals), so a
waiting user turn always goes before background work, then sleeps until the step's due time and gives
every running sequence one token. Due times are chained (``due = previous due +
step``) against the event loop's monotonic clock, so a late wake-up does not
stretch the simulation; a step that is already overdue runs at once.

A simulated prefix cache hashes the templated prompt in blocks of 16 tokens
(each block's hash chained over the whole prefix, like vLLM's block hashes) and
keeps an LRU of block hashes. Output tokens fill blocks too, so the next turn of
a conversation (history + previous reply) hits the cache. Only uncached prompt
tokens cost prefill time. Not modelled: chunked prefill / token budgets per
step, preemption, KV-cache memory limits other than the block LRU.

Abort semantics: when a request is aborted (:meth:`SimulatedEngine.abort`, or
the consumer closes / cancels the generator) it leaves the waiting queue or the
running batch at once, and its generator returns **without** an
:class:`EngineFinish`. :meth:`SimulatedEngine.close` instead fails in-flight
requests with :class:`protocol.errors.EngineError`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import random
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence

from protocol.errors import EngineError, TooLarge
from server.engines.base import (
    Engine,
    EngineDelta,
    EngineEvent,
    EngineFinish,
    EngineLoad,
    EngineRequest,
    SamplingOptions,
)
from server.engines.latency import RECENT_WINDOW, RecentLatency
from sessions.messages import ChatMessage

log = logging.getLogger(__name__)

#: Tokens per prefix-cache block (vLLM's default block size).
BLOCK_SIZE = 16
#: Upper end of the deterministic reply length when ``reply_tokens`` is unset.
DEFAULT_MAX_REPLY_TOKENS = 60

# The simulated tokeniser: runs of up to 6 word characters, or one punctuation
# character. Whitespace is not a token. Every text this engine emits
# re-tokenises to exactly the tokens it was generated as.
_TOKEN_RE = re.compile(r"\w{1,6}|[^\w\s]")
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"  # also the simulated end-of-sequence token

# Filler vocabulary for generated replies (each a single simulated token).
_VOCAB_TEXT = """
    i you we they it that this there here what when how why so and but or
    if then just really maybe always never often still again also too very
    quite a the an some any every each more most less much many few all
    feel think know see hear say tell ask hope wish want need like love
    miss keep find give take make let try help stay rest wait talk share
    smile laugh cry sigh dream sleep wake walk run sit stand go come leave
    day night today soon later now moment time year week hour minute
    sun moon star rain snow wind cloud sky sea river tree leaf flower
    garden home room window door light warm cold quiet calm soft gentle
    happy sad tired brave kind sweet bright dark slow fast small big
    good nice fine okay sure yes no well oh hmm friend heart mind voice
    story song book letter word idea plan reason answer chance way place
    tea coffee bread cake music movie game walk trip road city town
    morning evening little long short new old first last next other same
    together alone with without about around after before during near far
"""
_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(w for w in _VOCAB_TEXT.split() if len(w) <= 6)  # one token each
)


def tokenize(text: str) -> list[str]:
    """The simulated tokeniser (roughly one token per short word)."""
    return _TOKEN_RE.findall(text)


@functools.lru_cache(maxsize=2048)
def _content_tokens(content: str) -> tuple[str, ...]:
    """One message's content tokens, remembered: every turn re-tokenises the whole
    history (the prompt window is counted, then submitted), and the simulation's
    CPU is counted in the gateway's. Bounded by entries; a message is at most the
    input (or reply) limit, so the cache stays a few MB at worst."""
    return tuple(_TOKEN_RE.findall(content))


def _template_tokens(messages: Sequence[ChatMessage]) -> list[str]:
    """Tokens of the simulated chat template (ChatML-like), generation prompt included.

    Each message costs its content tokens plus 3 (start marker, role, end
    marker); the generation prompt adds 2.
    """
    out: list[str] = []
    for m in messages:
        out.append(_IM_START)
        out.append(m.role)
        out.extend(_content_tokens(m.content))
        out.append(_IM_END)
    out.append(_IM_START)
    out.append("assistant")
    return out


def _echo_texts(messages: Sequence[ChatMessage]) -> list[str]:
    """Per-token delta texts repeating the last user message (spacing kept roughly)."""
    content = next((m.content for m in reversed(messages) if m.role == "user"), "")
    out: list[str] = []
    for match in _TOKEN_RE.finditer(content):
        start = match.start()
        spaced = bool(out) and start > 0 and content[start - 1].isspace()
        out.append(" " + match.group() if spaced else match.group())
    return out


class _Seq:
    """One request inside the simulated scheduler."""

    __slots__ = (
        "request_id",
        "prompt_tokens",
        "block_hashes",
        "tail",
        "chain",
        "cached_tokens",
        "target",
        "finish_reason",
        "rng",
        "echo",
        "stop",
        "capital",
        "prev_punct",
        "emitted",
        "pending",
        "event",
        "done",
        "aborted",
        "error",
        "submitted_at",
        "ttft_ms",
        "fail_at",
        "warmup",
        "priority",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_tokens = 0
        self.block_hashes: list[int] | None = None
        self.tail: list[str] = []
        self.chain = 0
        self.cached_tokens = 0
        self.target = 1
        self.finish_reason = "stop"
        self.rng: random.Random | None = None
        self.echo: list[str] = []
        self.stop: frozenset[str] = frozenset()
        self.capital = True
        self.prev_punct = False
        self.emitted = 0
        self.pending: list[str] = []
        self.event = asyncio.Event()
        self.done = False
        self.aborted = False
        self.error: EngineError | None = None
        self.submitted_at = 0.0
        self.ttft_ms: float | None = None
        self.fail_at: int | None = None
        self.warmup = False
        self.priority = 0

    @property
    def background(self) -> bool:
        return self.priority > 0


class SimulatedEngine(Engine):
    """A timing simulation of a continuously batching engine. Not a model.

    See the module docstring for the timing model. All durations are in
    milliseconds.

    Args:
        ttft_ms: time to first token for a lone request with a fully cached
            (or empty) prompt.
        itl_ms: decode step time with one running sequence (inter-token latency).
        max_num_seqs: batch capacity; further requests wait in a FIFO queue.
        batch_slowdown: relative step-time growth per extra running sequence.
        prefill_ms_per_token: prefill cost of each uncached prompt token; it
            lengthens the whole step that admits the sequence.
        max_model_len: context window (prompt + reply) in simulated tokens.
        prefix_cache_blocks: LRU capacity of the simulated prefix cache in
            16-token blocks (0 disables the cache).
        seed: engine seed mixed into every reply's PRNG.
        reply_tokens: fixed natural reply length (for benchmarks); if None, a
            deterministic length in ``[min_reply_tokens, 60]``.
        min_reply_tokens: lower end of the deterministic reply length.
        echo: start each reply by repeating the last user message's words.
        label: shown in ``model_name`` as ``simulated:<label>``.
        fail_after_tokens: failure injection for tests: every request raises
            :class:`EngineError` after this many tokens (see :meth:`fail_after`).
    """

    def __init__(
        self,
        *,
        ttft_ms: float = 40.0,
        itl_ms: float = 20.0,
        max_num_seqs: int = 256,
        batch_slowdown: float = 0.002,
        prefill_ms_per_token: float = 0.02,
        max_model_len: int = 4096,
        prefix_cache_blocks: int = 65536,
        seed: int = 0,
        reply_tokens: int | None = None,
        min_reply_tokens: int = 8,
        echo: bool = False,
        label: str = "simulated-companion",
        fail_after_tokens: int | None = None,
    ) -> None:
        if ttft_ms < 0 or itl_ms < 0 or batch_slowdown < 0 or prefill_ms_per_token < 0:
            raise ValueError("simulated engine timings must be non-negative")
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if prefix_cache_blocks < 0:
            raise ValueError("prefix_cache_blocks must be non-negative")
        if reply_tokens is not None and reply_tokens < 1:
            raise ValueError("reply_tokens must be at least 1")
        self.ttft_ms = float(ttft_ms)
        self.itl_ms = float(itl_ms)
        self.max_num_seqs = int(max_num_seqs)
        self.batch_slowdown = float(batch_slowdown)
        self.prefill_ms_per_token = float(prefill_ms_per_token)
        self.max_model_len = int(max_model_len)
        self.prefix_cache_blocks = int(prefix_cache_blocks)
        self.seed = int(seed)
        self.reply_tokens = reply_tokens
        self.min_reply_tokens = max(1, int(min_reply_tokens))
        self.echo = bool(echo)
        self.label = label
        self.model_name = f"simulated:{label}"

        self._fail_tokens: int | None = fail_after_tokens
        self._fail_requests: int | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ready = False
        self._closed = False
        self._warmup_id: str | None = None

        self._requests: dict[str, _Seq] = {}
        self._waiting: OrderedDict[str, _Seq] = OrderedDict()
        self._waiting_tokens = 0
        # Background requests (priority > 0): all of them, those waiting, and
        # the prompt tokens of those waiting. User turns are admitted first.
        self._background = 0
        self._background_waiting = 0
        self._background_waiting_tokens = 0
        self._running: dict[str, _Seq] = {}
        self._step_due: float | None = None

        self._cache: OrderedDict[int, None] = OrderedDict()

        # Engine TTFTs, and simulated step times as the inter-token latency.
        self._latency = RecentLatency()
        self._recent_reply: deque[int] = deque(maxlen=RECENT_WINDOW)
        self._steps = 0
        self._late_steps = 0
        self._max_lag_ms = 0.0
        self._cache_query_tokens = 0
        self._cache_hit_tokens = 0

    # ------------------------------------------------------------------ life

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Start the step loop and run a tiny warm-up generation."""
        if self._ready:
            return
        self._closed = False
        self._loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(
                self._step_loop(), name=f"simulated-engine-steps:{self.label}"
            )
        self._warmup_id = f"simulated-warmup-{uuid.uuid4().hex}"
        warm = EngineRequest(
            request_id=self._warmup_id,
            messages=(ChatMessage("user", "warm up"),),
            sampling=SamplingOptions(max_tokens=2),
        )
        finished = False
        async for event in self.generate(warm):
            if isinstance(event, EngineFinish):
                finished = True
        self._warmup_id = None
        if not finished:
            raise EngineError("simulated engine warm-up did not finish")
        self._ready = True
        log.info(
            "simulated engine %s ready (timing simulation, not a model): ttft=%.1fms "
            "itl=%.1fms max_num_seqs=%d",
            self.model_name,
            self.ttft_ms,
            self.itl_ms,
            self.max_num_seqs,
        )

    async def close(self) -> None:
        """Fail in-flight requests with EngineError, then cancel and await the step loop."""
        self._closed = True
        self._ready = False
        for seq in list(self._requests.values()):
            self._fail(seq, EngineError("simulated engine closed"))
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._step_due = None
        log.info("simulated engine %s closed", self.model_name)

    # ------------------------------------------------------------ interface

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Simulated prompt tokens: content tokens + 3 per message + 2 (generation prompt)."""
        return len(_template_tokens(messages))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream simulated deltas, then one EngineFinish.

        Pending tokens are merged into one delta (``tokens=n``) if the consumer
        is slower than the steps. An aborted request's generator returns
        without an EngineFinish. Raises :class:`EngineError` on injected
        failure or engine close, :class:`TooLarge` if the prompt does not fit.
        """
        seq = self._submit(request)
        try:
            while True:
                if seq.aborted:
                    return
                pending = seq.pending
                if pending:
                    n = len(pending)
                    text = pending[0] if n == 1 else "".join(pending)
                    pending.clear()
                    yield EngineDelta(text, n)
                    continue
                if seq.error is not None:
                    raise seq.error
                if seq.done:
                    yield EngineFinish(
                        finish_reason=seq.finish_reason,
                        prompt_tokens=seq.prompt_tokens,
                        completion_tokens=seq.emitted,
                        cached_prompt_tokens=seq.cached_tokens,
                        engine_ttft_ms=seq.ttft_ms,
                    )
                    return
                seq.event.clear()
                await seq.event.wait()
        finally:
            if not seq.done:
                # Consumer closed or cancelled the stream: free the slot now.
                self._discard(seq)
                seq.aborted = True

    async def abort(self, request_id: str) -> None:
        seq = self._requests.get(request_id)
        if seq is None:
            return
        self._discard(seq)
        seq.aborted = True
        seq.event.set()

    def load(self) -> EngineLoad:
        """Running / waiting counts; medians of the last 64 engine TTFTs and simulated step times."""
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            max_num_seqs=self.max_num_seqs,
            recent_ttft_ms=self._latency.ttft_ms(),
            recent_itl_ms=self._latency.itl_ms(),
            background=self._background,
            background_waiting=self._background_waiting,
        )

    # --------------------------------------------------------------- extras

    def step_time_ms(self, running: int, admitted: int = 0, prefill_tokens: int = 0) -> float:
        """Simulated duration of one step (pure function of the configuration).

        ``itl_ms * (1 + batch_slowdown * (running - 1))``, plus, if the step
        admits ``admitted > 0`` sequences, ``max(0, ttft_ms - itl_ms)`` and
        ``prefill_ms_per_token * prefill_tokens`` (their uncached prompt tokens).
        """
        t = self.itl_ms * (1.0 + self.batch_slowdown * (max(running, 1) - 1))
        if admitted > 0:
            t += max(0.0, self.ttft_ms - self.itl_ms) + self.prefill_ms_per_token * prefill_tokens
        return t

    def estimate_ttft_ms(self, prompt_tokens: int) -> float:
        """Predicted time to first token for a request submitted now.

        With ``R`` running, ``W`` waiting (holding ``P_w`` prompt tokens),
        ``ahead = W + 1``, ``free = max_num_seqs - R``, ``rem`` = time left in
        the step in flight, ``S(n, a, p)`` = :meth:`step_time_ms`:

        * ``ahead <= free`` (admitted next step):
          ``rem + S(R + ahead, ahead, P_w + prompt_tokens)``
        * otherwise ``deficit = ahead - free`` slots must free up first; with a
          full batch about ``max_num_seqs / L`` slots free per step (``L`` = mean
          recent reply length), so ``k = ceil(deficit * L / max_num_seqs)`` steps:
          ``rem + k * S(max, 1, 0) + prefill_ms_per_token * P_w + S(max, 1, prompt_tokens)``

        The prompt is assumed uncached (a conservative estimate).
        """
        running = len(self._running)
        remaining = 0.0
        if running and self._step_due is not None and self._loop is not None:
            remaining = max(0.0, (self._step_due - self._loop.time()) * 1000.0)
        # Waiting background requests are admitted after a user turn: not ahead of it.
        ahead = len(self._waiting) - self._background_waiting + 1
        waiting_tokens = self._waiting_tokens - self._background_waiting_tokens
        free = self.max_num_seqs - running
        if ahead <= free:
            return remaining + self.step_time_ms(
                running + ahead, ahead, waiting_tokens + prompt_tokens
            )
        deficit = ahead - free
        steps = math.ceil(deficit * self._mean_reply_tokens() / self.max_num_seqs)
        full = self.max_num_seqs
        return (
            remaining
            + steps * self.step_time_ms(full, 1, 0)
            + self.prefill_ms_per_token * waiting_tokens
            + self.step_time_ms(full, 1, prompt_tokens)
        )

    def fail_after(self, tokens: int | None, *, requests: int | None = None) -> None:
        """Failure injection for tests: new requests raise EngineError after ``tokens`` tokens.

        Applies to every later request, or only to the next ``requests`` ones.
        ``fail_after(None)`` turns it off. The warm-up is never affected.
        """
        self._fail_tokens = tokens
        self._fail_requests = requests if tokens is not None else None

    def stats(self) -> dict[str, float]:
        """Simulation counters (steps, overdue steps, prefix-cache use)."""
        return {
            "steps": self._steps,
            "late_steps": self._late_steps,
            "max_lag_ms": self._max_lag_ms,
            "prefix_cache_blocks_used": len(self._cache),
            "prefix_cache_query_tokens": self._cache_query_tokens,
            "prefix_cache_hit_tokens": self._cache_hit_tokens,
        }

    # ------------------------------------------------------------- internals

    def _mean_reply_tokens(self) -> float:
        if self._recent_reply:
            return sum(self._recent_reply) / len(self._recent_reply)
        if self.reply_tokens is not None:
            return float(self.reply_tokens)
        return (self.min_reply_tokens + max(self.min_reply_tokens, DEFAULT_MAX_REPLY_TOKENS)) / 2

    def _request_seed(self, request: EngineRequest) -> int:
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.seed}\x00{request.sampling.seed}\x00".encode())
        for m in request.messages:
            h.update(m.role.encode())
            h.update(b"\x1f")
            h.update(m.content.encode())
            h.update(b"\x1e")
        return int.from_bytes(h.digest(), "big")

    def _submit(self, request: EngineRequest) -> _Seq:
        if self._closed or self._task is None or self._task.done() or self._loop is None:
            raise EngineError("simulated engine is not running")
        rid = request.request_id
        if rid in self._requests:
            raise EngineError(f"simulated engine: duplicate request id {rid!r}")
        tokens = _template_tokens(request.messages)
        n_prompt = len(tokens)
        if n_prompt >= self.max_model_len:
            raise TooLarge(
                f"prompt is {n_prompt} tokens; the simulated model's context is "
                f"{self.max_model_len}"
            )
        sampling = request.sampling
        seq = _Seq(rid)
        seq.prompt_tokens = n_prompt
        seq.warmup = rid == self._warmup_id
        seq.rng = rng = random.Random(self._request_seed(request))
        if self.echo:
            seq.echo = _echo_texts(request.messages)
        seq.stop = frozenset(s.strip() for s in sampling.stop if s.strip())

        # Natural length is drawn first so the text prefix never depends on caps.
        if self.reply_tokens is not None:
            natural = self.reply_tokens
        else:
            natural = rng.randint(
                self.min_reply_tokens, max(self.min_reply_tokens, DEFAULT_MAX_REPLY_TOKENS)
            )
        natural += len(seq.echo)
        max_tokens = max(1, sampling.max_tokens)
        if sampling.ignore_eos or natural > max_tokens:
            target, reason = max_tokens, "length"
        else:
            target, reason = natural, "stop"
        room = self.max_model_len - n_prompt
        if target > room:
            target, reason = room, "length"
        seq.target, seq.finish_reason = target, reason

        if self.prefix_cache_blocks:
            hashes: list[int] = []
            chain = 0
            full = n_prompt - n_prompt % BLOCK_SIZE
            for i in range(0, full, BLOCK_SIZE):
                chain = hash((chain, tuple(tokens[i : i + BLOCK_SIZE])))
                hashes.append(chain)
            seq.block_hashes = hashes
            seq.chain = chain
            seq.tail = tokens[full:]

        if self._fail_tokens is not None and not seq.warmup:
            seq.fail_at = max(0, self._fail_tokens)
            if self._fail_requests is not None:
                self._fail_requests -= 1
                if self._fail_requests <= 0:
                    self._fail_tokens = self._fail_requests = None

        seq.submitted_at = self._loop.time()
        seq.priority = request.priority
        self._requests[rid] = seq
        self._waiting[rid] = seq
        self._waiting_tokens += n_prompt
        if seq.background:
            self._background += 1
            self._background_waiting += 1
            self._background_waiting_tokens += n_prompt
        self._wake.set()
        return seq

    def _next_waiting(self) -> _Seq:
        """Take the next request to admit: the oldest of the lowest priority (vLLM's
        ``priority`` policy), so a waiting user turn goes before background work."""
        waiting = self._waiting
        if 0 < self._background_waiting < len(waiting):
            seq = min(waiting.values(), key=lambda s: s.priority)  # the first of the lowest
            del waiting[seq.request_id]
        else:
            _, seq = waiting.popitem(last=False)
        if seq.background:
            self._background_waiting -= 1
            self._background_waiting_tokens -= seq.prompt_tokens
        return seq

    def _discard(self, seq: _Seq) -> None:
        """Take a request out of the scheduler at once (waiting or running)."""
        if seq.done:
            return
        seq.done = True
        rid = seq.request_id
        if self._waiting.pop(rid, None) is not None:
            self._waiting_tokens -= seq.prompt_tokens
            if seq.background:
                self._background_waiting -= 1
                self._background_waiting_tokens -= seq.prompt_tokens
        if seq.background:
            self._background -= 1
        self._running.pop(rid, None)
        if self._requests.get(rid) is seq:
            del self._requests[rid]

    def _fail(self, seq: _Seq, error: EngineError) -> None:
        self._discard(seq)
        seq.error = error
        seq.event.set()

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._discard(seq)
        seq.finish_reason = reason
        if not seq.warmup:
            self._recent_reply.append(seq.emitted)
        if reason == "stop" and self.prefix_cache_blocks:
            self._cache_token(seq, _IM_END)
        seq.event.set()

    def _cache_insert(self, h: int) -> None:
        cache = self._cache
        if h in cache:
            cache.move_to_end(h)
        else:
            cache[h] = None
            if len(cache) > self.prefix_cache_blocks:
                cache.popitem(last=False)

    def _cache_token(self, seq: _Seq, token: str) -> None:
        seq.tail.append(token)
        if len(seq.tail) == BLOCK_SIZE:
            seq.chain = hash((seq.chain, tuple(seq.tail)))
            seq.tail = []
            self._cache_insert(seq.chain)

    def _admit(self, seq: _Seq) -> int:
        """Look up and fill the prefix cache; returns the uncached prompt tokens."""
        hashes = seq.block_hashes
        if hashes:
            cache = self._cache
            # Like vLLM, at least the last prompt token is always computed.
            max_hit = (seq.prompt_tokens - 1) // BLOCK_SIZE
            hits = 0
            counting = True
            for i, h in enumerate(hashes):
                if counting and i < max_hit and h in cache:
                    hits += 1
                else:
                    counting = False
                self._cache_insert(h)
            seq.cached_tokens = hits * BLOCK_SIZE
        seq.block_hashes = None
        if not seq.warmup:
            self._cache_query_tokens += seq.prompt_tokens
            self._cache_hit_tokens += seq.cached_tokens
        return seq.prompt_tokens - seq.cached_tokens

    def _next_text(self, seq: _Seq) -> str:
        i = seq.emitted
        if i < len(seq.echo):
            return seq.echo[i]
        rng = seq.rng
        assert rng is not None
        r = rng.random()
        # Never punctuation as the first generated token (nor right after echo).
        if i > len(seq.echo) and not seq.prev_punct and r < 0.12:
            seq.prev_punct = True
            if r < 0.06:
                seq.capital = True
                return "."
            return ","
        seq.prev_punct = False
        word = _VOCAB[rng.randrange(len(_VOCAB))]
        if seq.capital:
            seq.capital = False
            word = word.capitalize()
        return " " + word if i > 0 else word

    def _emit(self, now: float) -> None:
        """Give every running sequence one token (end of a step)."""
        caching = self.prefix_cache_blocks > 0
        for seq in list(self._running.values()):
            if seq.fail_at is not None and seq.emitted >= seq.fail_at:
                self._fail(
                    seq,
                    EngineError(
                        f"simulated engine failure injected after {seq.emitted} tokens"
                    ),
                )
                continue
            text = self._next_text(seq)
            token = text.strip()
            if seq.stop and token in seq.stop:
                self._finish(seq, "stop")
                continue
            seq.pending.append(text)
            seq.emitted += 1
            if seq.emitted == 1:
                seq.ttft_ms = (now - seq.submitted_at) * 1000.0
                # Background requests wait behind user turns by design: their
                # first tokens would skew the median admission control reads.
                if not seq.warmup and not seq.background:
                    self._latency.add_ttft_ms(seq.ttft_ms)
            if caching:
                self._cache_token(seq, token)
            if seq.emitted >= seq.target:
                self._finish(seq, seq.finish_reason)
            else:
                seq.event.set()

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        prev_due: float | None = None
        try:
            while True:
                if not self._running and not self._waiting:
                    prev_due = None
                    self._step_due = None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # Chain steps on the schedule; an idle engine starts a step now.
                start = loop.time() if prev_due is None else prev_due
                admitted = 0
                prefill = 0
                while self._waiting and len(self._running) < self.max_num_seqs:
                    seq = self._next_waiting()
                    rid = seq.request_id
                    self._waiting_tokens -= seq.prompt_tokens
                    self._running[rid] = seq
                    prefill += self._admit(seq)
                    admitted += 1
                step_ms = self.step_time_ms(len(self._running), admitted, prefill)
                due = start + step_ms / 1000.0
                self._step_due = due
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    # Behind schedule: run now, but still let consumers run.
                    self._late_steps += 1
                    self._max_lag_ms = max(self._max_lag_ms, -delay * 1000.0)
                    await asyncio.sleep(0)
                end = loop.time()
                self._steps += 1
                # The simulated step time (catch-up steps after a stall would
                # otherwise drag a wall-clock median towards zero).
                self._latency.add_itl_ms(step_ms)
                self._emit(end)
                prev_due = due
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("simulated engine step loop crashed")
            self._ready = False
            for seq in list(self._requests.values()):
                self._fail(seq, EngineError("simulated engine step loop crashed"))
