"""Rapport's in-process vLLM engine against vLLM's own OpenAI server.

The same model with the same settings is served two ways, one after the other
(never both at once, so they do not compete for the cores):

* **rapport**: ``python -m rapport.cli serve --engine vllm`` (vLLM's AsyncLLM
  inside the gateway process, engine core in a child process), driven over
  the WebSocket protocol: one socket per simulated user, ``turn.start`` per
  turn; Rapport keeps the conversation in Redis and builds the prompt window.
* **vllm**: ``python -m vllm.entrypoints.openai.api_server`` (same model,
  dtype, ``max_model_len``, ``enforce_eager``, KV cache size and block size,
  ``--enable-prompt-tokens-details``), driven with streaming chat completions
  (``stream_options.include_usage``). The client keeps the conversation itself
  and sends what Rapport would send: Rapport's default system prompt, the
  history so far and the new user message, same temperature (0) and
  ``max_tokens``.

Both clients are lean (the toolkit's :class:`clients.driver.Driver`; the
``openai`` SDK's streaming chat completions), run in this one process on one
event loop, and measure on the client's clock:

* time to first token: sending the request to the first non-empty content
  delta (``turn.delta`` / an SSE chunk whose ``delta.content`` is non-empty);
* the gap between consecutive content deltas of a turn. A delta may carry
  several tokens on both paths (when a consumer lags, vLLM merges the
  outputs it has queued), so tokens per delta is reported too;
* output tokens/s: completion tokens of all turns at that concurrency divided
  by the wall time from the first send to the last end. vLLM's usage counts the
  end-of-sequence token of a reply that stopped by itself; Rapport counts only
  tokens that produced text. The vLLM figure is corrected by one for each
  ``finish_reason == "stop"`` so both count the same tokens;
* prefix-cache share: cached / prompt tokens of turns 2..N (Rapport:
  ``turn.end.usage.cached_prompt_tokens``; vLLM:
  ``usage.prompt_tokens_details.cached_tokens``), pooled over the turns, plus
  an estimate of the best share the cache could give (the prompt's common
  prefix with the previous turn's prompt + reply, rounded down to whole KV
  blocks: the new user message can never be a hit, nor a block left partial).

Scenarios, per server and round:

* ``--concurrency 1,4,8``: that many users at once, each holding a
  ``--turns``-turn conversation of short scripted messages (the same messages
  on both servers; a tag in every message keeps users, rounds and
  concurrencies from sharing a cache prefix beyond the system prompt).
* long conversation: 1 user, ``--long-turns`` turns of about
  ``--long-message-tokens``-token messages at ``--long-max-tokens``, long
  enough that Rapport's window must trim (by whole blocks of 4 turns, see
  sessions/prompt.py). vLLM's own server is driven twice: ``vllm`` with the
  window Rapport would build (the client applies the same trimming with the
  same tokenizer: the comparable figure), and ``vllm-full`` with the whole
  history, which vLLM rejects (HTTP 400) once prompt + max_tokens exceed the
  context; those turns are reported as rejected and left out of its history.
  ``vllm-full`` uses its own message tag so it cannot reuse ``vllm``'s cache.

With ``--repeat N`` the whole set runs N rounds, alternating which server goes
first, so that drifting background load on the machine hits both paths alike.
Each server is warmed up with one request before measuring.

Usage::

    python bench/vllm_compare.py                            # 1,4,8 users, 5 turns, long run
    python bench/vllm_compare.py --repeat 2 --json out.json
    python bench/vllm_compare.py --skip-vllm-server --concurrency 1 --no-long

The goal stated for this path: Rapport's TTFT within 5 % of vLLM's own server
at every concurrency, throughput no lower, prefix-cache share >= 90 % on
turns 2-5, also in a conversation long enough to be trimmed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Runnable as `python bench/vllm_compare.py` from a checkout: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai
import redis

from clients.driver import Driver
from clients.percentiles import percentile
from protocol import client_frames
from server.config import DEFAULT_SYSTEM_PROMPT, Settings
from sessions.messages import ChatMessage
from sessions.prompt import PastTurn, build_window, render
from testkit.redis_prefix import clean_prefix
from testkit.servers import ChildServer, ServerProcess, VllmServer

REDIS_URL = os.environ.get("RAPPORT_REDIS_URL", "redis://127.0.0.1:6379/0")
#: vLLM's default KV block size on CPU (vllm/platforms/cpu.py) when --block-size is not given.
CPU_DEFAULT_BLOCK_SIZE = 128
MAX_HISTORY_TURNS = Settings().max_history_turns  # Rapport's default window cap (16)
PATHS = ("rapport", "vllm")
#: A vLLM server may take a while to release its engine core after SIGTERM.
STOP_TIMEOUT_S = 60.0

SHORT_MESSAGES = (
    "Hi! I had a long day at work and I'm finally home. Can you cheer me up a little?",
    "Thanks. My boss moved the deadline up again, so tomorrow will be busy too.",
    "I think I'll cook something warm tonight. Any simple idea?",
    "That sounds nice. Do you remember what made my day hard?",
    "You're right. I'll go to bed early and take a walk in the morning.",
    "What's a good book to read on a quiet evening?",
    "My sister called me today, we hadn't talked in weeks.",
    "I'm a bit nervous about my exam next week.",
)

LONG_SENTENCES = (
    "This morning I woke up before the alarm and watched the light come through the curtains for a while.",
    "The kitchen was cold, so I made tea and stood by the window while the kettle ticked as it cooled.",
    "On the way to the station I passed the bakery that always smells of cinnamon, and I almost went in.",
    "The train was crowded, and a child next to me kept asking his mother why the clouds move so slowly.",
    "At work we had the weekly meeting, which ran long because nobody could agree on the new schedule.",
    "My colleague Priya brought cookies for her birthday and we ate them standing around her desk.",
    "In the afternoon I finally finished the report I had been putting off for almost two weeks.",
    "I felt proud for a moment, and then a little silly for having worried about it for so long.",
    "After work I called my sister, who told me about her new apartment and the noisy neighbours upstairs.",
    "She asked whether I was sleeping better, and I admitted that some nights my mind still races.",
    "We talked about our parents, and about the summer trip to the lake that we keep planning and postponing.",
    "Walking home I noticed that the trees on our street have started to turn yellow at the edges.",
    "A neighbour was playing the piano with the window open, the same slow piece again and again.",
    "For dinner I cooked rice with vegetables and ate it on the balcony wrapped in a blanket.",
    "Later I tried to read, but I kept rereading the same page without taking anything in.",
    "I wonder sometimes whether I should change jobs, or whether I just need a longer holiday.",
    "Then I remember the people I work with, and how much I would miss our silly lunch conversations.",
    "Tomorrow I want to get up early, go for a run along the river, and see the fog over the water.",
    "I also promised myself to answer the letters that have been lying on my desk for a month.",
    "It is strange how small tasks can feel heavy when they pile up, and light once they are done.",
    "Before bed I wrote three things I was grateful for, the way my friend suggested last spring.",
    "Tonight they were the cookies, my sister's laugh on the phone, and the piano across the street.",
)


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class TurnRecord:
    path: str  # "rapport", "vllm" or "vllm-full"
    scenario: str  # "c4", "long", ...
    round: int
    user: int
    turn: int  # 1-based
    ok: bool = False
    error: str | None = None
    ttft_ms: float | None = None
    gaps_ms: list[float] = field(default_factory=list)
    deltas: int = 0
    completion_tokens: int = 0  # tokens that produced text (see module doc)
    raw_completion_tokens: int | None = None  # as the server reported it
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    server_ttft_ms: float | None = None  # Rapport's turn.end.timings.ttft_ms
    turn_ms: float | None = None
    user_message_tokens: int | None = None
    ideal_cached_tokens: int | None = None  # estimate, filled in after the run
    needed_prompt_tokens: int | None = None  # a rejected request's prompt size, filled in after the run
    text: str = ""


@dataclass(slots=True)
class Exchange:
    """What a client sent and got in one turn, for the after-run cache estimate."""

    record: TurnRecord
    user_text: str
    window: list[ChatMessage]  # the messages sent (Rapport's: recomputed after the run)
    reply: str


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

def rapport_server(args: argparse.Namespace, log_dir: Path, prefix: str, round_no: int) -> ServerProcess:
    flags = ["--engine", "vllm", "--auth", "dev", "--default-temperature", "0", "--ttft-budget-ms", "600000",
             "--hard-deadline-ms", "600000", "--turns-per-minute", "100000", "--max-connections-per-user", "1000",
             "--model", args.model, "--dtype", "float32", "--max-model-len", str(args.max_model_len)]
    if args.block_size:
        flags += ["--vllm-arg", f"block_size={args.block_size}"]
    return ServerProcess(prefix=prefix, redis_url=args.redis_url, extra=flags, name=f"rapport-round{round_no}",
                         env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}, log_dir=log_dir)


def vllm_server(args: argparse.Namespace, log_dir: Path, served_name: str, round_no: int) -> VllmServer:
    flags = ["--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
    if args.block_size:
        flags += ["--block-size", str(args.block_size)]
    return VllmServer(args.model, served_name=served_name, max_model_len=args.max_model_len,
                      kv_cache_gib=str(args.kv_cache_gib), extra=flags, name=f"vllm-round{round_no}", log_dir=log_dir)


# ---------------------------------------------------------------------------
# Tokenizer (window trimming for the vLLM client, message sizing, estimates)
# ---------------------------------------------------------------------------

class Tokens:
    """The model's tokenizer and chat template, counted exactly as Rapport's engine counts."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        text = self.tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            add_generation_prompt=True, tokenize=False)
        return list(self.tok.encode(text, add_special_tokens=False))

    def count(self, messages: Any) -> int:
        return len(self.prompt_ids(list(messages)))

    def text_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def short_message(tag: str, user: int, k: int) -> str:
    return f"{SHORT_MESSAGES[(user + k) % len(SHORT_MESSAGES)]} (#{tag}.{user}.{k + 1})"


def long_message(tokens: Tokens, tag: str, k: int, target: int) -> str:
    parts = [f"(#{tag}.{k + 1}) Part {k + 1} of my day, bear with me."]
    i = k * 5
    while len(tokens.text_ids(" ".join(parts))) < target:
        parts.append(LONG_SENTENCES[i % len(LONG_SENTENCES)])
        i += 1
    return " ".join(parts)


def window_for(mode: str, history: list[PastTurn], text: str, max_prompt_tokens: int,
               tokens: Tokens | None) -> list[ChatMessage]:
    """The messages sent: ``rapport`` applies Rapport's window, ``full`` the whole history."""
    if mode == "full":
        return render(DEFAULT_SYSTEM_PROMPT, history, text)
    return build_window(system_prompt=DEFAULT_SYSTEM_PROMPT, history=history, new_text=text,
                        max_history_turns=MAX_HISTORY_TURNS, max_prompt_tokens=max_prompt_tokens,
                        count_tokens=tokens.count if tokens is not None else None)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

class RapportUser:
    """One simulated user on one WebSocket."""

    def __init__(self, driver: Driver, conversation: str) -> None:
        self.driver = driver
        self.conversation = conversation

    @classmethod
    async def open(cls, url: str, name: str, conversation: str) -> RapportUser:
        driver = await Driver.open(url, user=name, client={"name": "vllm-compare", "version": "1"},
                                   compression=None, open_timeout=60)
        return cls(driver, conversation)

    async def _recv(self, timeout: float) -> dict[str, Any]:
        """The next frame other than a heartbeat ping, which is answered on the way."""
        while True:
            frame = await self.driver.recv(timeout)
            if frame["type"] != "ping":
                return frame
            await self.driver.send(client_frames.pong(frame.get("t")))

    async def turn(self, rec: TurnRecord, text: str, max_tokens: int, timeout: float) -> Exchange:
        start = client_frames.turn_start(text, conversation_id=self.conversation,
                                         options={"temperature": 0, "max_tokens": max_tokens})
        ctid = start["client_turn_id"]
        turn_id: str | None = None
        parts: list[str] = []
        last: float | None = None
        sent = time.perf_counter()
        await self.driver.send(start)
        while True:
            frame = await self._recv(timeout)
            kind = frame.get("type")
            now = time.perf_counter()
            if kind == "turn.accepted" and frame.get("client_turn_id") == ctid:
                turn_id = frame.get("turn_id")
            elif kind == "turn.delta" and turn_id is not None and frame.get("turn_id") == turn_id:
                piece = frame.get("text") or ""
                if not piece:
                    continue
                if last is None:
                    rec.ttft_ms = (now - sent) * 1000.0
                else:
                    rec.gaps_ms.append((now - last) * 1000.0)
                last = now
                rec.deltas += 1
                parts.append(piece)
            elif kind == "turn.end" and turn_id is not None and frame.get("turn_id") == turn_id:
                rec.turn_ms = (now - sent) * 1000.0
                usage = frame.get("usage") or {}
                rec.completion_tokens = int(usage.get("completion_tokens") or 0)
                rec.raw_completion_tokens = rec.completion_tokens
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.cached_tokens = usage.get("cached_prompt_tokens")
                rec.finish_reason = frame.get("finish_reason")
                rec.server_ttft_ms = (frame.get("timings") or {}).get("ttft_ms")
                rec.text = frame.get("text") or "".join(parts)
                rec.ok = rec.finish_reason in ("stop", "length")
                if not rec.ok:
                    rec.error = f"finish_reason {rec.finish_reason}"
                break
            elif kind == "error" and frame.get("client_turn_id") in (None, ctid):
                rec.error = f"{frame.get('code')}: {frame.get('message')}"
                rec.turn_ms = (now - sent) * 1000.0
                break
        return Exchange(rec, text, [], rec.text)

    async def close(self) -> None:
        await self.driver.close()


class VllmUser:
    """One simulated user of vLLM's OpenAI server; keeps its own conversation."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, mode: str, max_model_len: int,
                 tokens: Tokens | None) -> None:
        self.client = client
        self.model = model
        self.mode = mode
        self.max_model_len = max_model_len
        self.tokens = tokens
        self.history: list[PastTurn] = []

    async def turn(self, rec: TurnRecord, text: str, max_tokens: int, timeout: float) -> Exchange:
        # The window is built before the clock starts (Rapport builds its own inside its TTFT).
        window = window_for(self.mode, self.history, text, self.max_model_len - max_tokens, self.tokens)
        parts: list[str] = []
        last: float | None = None
        usage: Any = None
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                stream = await self.client.chat.completions.create(
                    model=self.model, messages=[{"role": m.role, "content": m.content} for m in window],
                    stream=True, stream_options={"include_usage": True}, temperature=0, top_p=1.0,
                    max_tokens=max_tokens)
                async for chunk in stream:
                    now = time.perf_counter()
                    for choice in chunk.choices:
                        piece = choice.delta.content if choice.delta is not None else None
                        if piece:
                            if last is None:
                                rec.ttft_ms = (now - sent) * 1000.0
                            else:
                                rec.gaps_ms.append((now - last) * 1000.0)
                            last = now
                            rec.deltas += 1
                            parts.append(piece)
                        if choice.finish_reason:
                            rec.finish_reason = choice.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
        except openai.APIStatusError as exc:
            rec.turn_ms = (time.perf_counter() - sent) * 1000.0
            # The SDK keeps the server's error object as the body: its message says why.
            body = exc.body if isinstance(exc.body, dict) else {}
            rec.error = f"HTTP {exc.status_code}: {str(body.get('message') or exc.message)[:300]}"
            return Exchange(rec, text, window, "")
        rec.turn_ms = (time.perf_counter() - sent) * 1000.0
        rec.text = "".join(parts)
        if usage is None:
            rec.error = "no usage in the stream"
            return Exchange(rec, text, window, rec.text)
        raw_completion = int(usage.completion_tokens or 0)
        rec.raw_completion_tokens = raw_completion
        # vLLM counts the end-of-sequence token of a reply that stopped by itself; it carries no text.
        rec.completion_tokens = max(0, raw_completion - (1 if rec.finish_reason == "stop" else 0))
        rec.prompt_tokens = usage.prompt_tokens
        details = usage.prompt_tokens_details
        rec.cached_tokens = int((details.cached_tokens if details is not None else 0) or 0)
        rec.ok = rec.finish_reason in ("stop", "length")
        if rec.ok:
            self.history.append(PastTurn(text, rec.text))
        else:
            rec.error = f"finish_reason {rec.finish_reason}"
        return Exchange(rec, text, window, rec.text)


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class Run:
    path: str
    scenario: str
    round: int
    users: int
    max_tokens: int
    wall_s: float
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    exchanges: list[Exchange]


async def run_conversations(path: str, make_user: Any, scenario: str, round_no: int, users: int,
                            messages: list[list[str]], max_tokens: int, think_s: float,
                            timeout: float) -> Run:
    """``users`` users at once, user ``i`` sending ``messages[i]`` one turn after the other."""
    sessions = [await make_user(i) for i in range(users)]
    exchanges: list[Exchange] = []

    async def one(i: int) -> None:
        for k, text in enumerate(messages[i]):
            if k and think_s > 0:
                await asyncio.sleep(think_s)
            rec = TurnRecord(path=path, scenario=scenario, round=round_no, user=i, turn=k + 1)
            try:
                ex = await sessions[i].turn(rec, text, max_tokens, timeout)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                rec.error = f"client: {type(exc).__name__}: {exc}"
                ex = Exchange(rec, text, [], "")
            exchanges.append(ex)

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(users)))
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    for s in sessions:
        close = getattr(s, "close", None)
        if close is not None:
            await close()
    exchanges.sort(key=lambda e: (e.record.user, e.record.turn))
    return Run(path, scenario, round_no, users, max_tokens, wall, load0, load1, exchanges)


def plan_short(tag: str, users: int, turns: int) -> list[list[str]]:
    return [[short_message(tag, i, k) for k in range(turns)] for i in range(users)]


def plan_long(tokens: Tokens, tag: str, turns: int, target: int) -> list[list[str]]:
    return [[long_message(tokens, tag, k, target) for k in range(turns)]]


async def drive_rapport(args: argparse.Namespace, base_url: str, round_no: int,
                        tokens: Tokens | None) -> list[Run]:
    ws_url = base_url.replace("http://", "ws://") + "/v1/ws"
    tag_base = uuid.uuid4().hex[:4]
    runs: list[Run] = []

    def maker(scenario: str):
        async def make(i: int) -> RapportUser:
            return await RapportUser.open(ws_url, f"cmp-{tag_base}-{scenario}-{i}", f"conv-{scenario}")
        return make

    warm = await run_conversations("rapport", maker("warmup"), "warmup", round_no, 1,
                                   [["Hello! How are you today?"]], args.max_tokens, 0, args.turn_timeout_s)
    _check_warmup(warm)
    for c in args.concurrency:
        scenario = f"c{c}"
        run = await run_conversations("rapport", maker(scenario), scenario, round_no, c,
                                      plan_short(f"r{round_no}c{c}", c, args.turns), args.max_tokens,
                                      args.think_ms / 1000.0, args.turn_timeout_s)
        runs.append(run)
        print_progress(run)
    if tokens is not None:
        run = await run_conversations("rapport", maker("long"), "long", round_no, 1,
                                      plan_long(tokens, f"r{round_no}L", args.long_turns,
                                                args.long_message_tokens),
                                      args.long_max_tokens, args.think_ms / 1000.0, args.turn_timeout_s)
        runs.append(run)
        print_progress(run)
    return runs


async def drive_vllm(args: argparse.Namespace, base_url: str, served_name: str, round_no: int,
                     tokens: Tokens | None) -> list[Run]:
    runs: list[Run] = []
    # No retries: a refused or failed request is a figure here, not something to hide.
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                                  timeout=openai.Timeout(args.turn_timeout_s, connect=30.0)) as client:
        # Open the pool's connections before measuring, as the WebSocket users connect first.
        await asyncio.gather(*(client.models.list() for _ in range(max(args.concurrency))))

        def maker(mode: str):
            async def make(i: int) -> VllmUser:
                return VllmUser(client, served_name, mode, args.max_model_len, tokens)
            return make

        warm = await run_conversations("vllm", maker("full"), "warmup", round_no, 1,
                                       [["Hello! How are you today?"]], args.max_tokens, 0, args.turn_timeout_s)
        _check_warmup(warm)
        for c in args.concurrency:
            scenario = f"c{c}"
            # Short conversations never reach the window's limits: the full history is Rapport's window.
            run = await run_conversations("vllm", maker("full"), scenario, round_no, c,
                                          plan_short(f"r{round_no}c{c}", c, args.turns), args.max_tokens,
                                          args.think_ms / 1000.0, args.turn_timeout_s)
            runs.append(run)
            print_progress(run)
        if tokens is not None:
            run = await run_conversations("vllm", maker("rapport"), "long", round_no, 1,
                                          plan_long(tokens, f"r{round_no}L", args.long_turns,
                                                    args.long_message_tokens),
                                          args.long_max_tokens, args.think_ms / 1000.0, args.turn_timeout_s)
            runs.append(run)
            print_progress(run)
            run = await run_conversations("vllm-full", maker("full"), "long", round_no, 1,
                                          plan_long(tokens, f"r{round_no}F", args.long_turns,
                                                    args.long_message_tokens),
                                          args.long_max_tokens, args.think_ms / 1000.0, args.turn_timeout_s)
            runs.append(run)
            print_progress(run)
    return runs


def _check_warmup(run: Run) -> None:
    rec = run.exchanges[0].record
    if not rec.ok:
        raise RuntimeError(f"{run.path} warm-up turn failed: {rec.error}")


def print_progress(run: Run) -> None:
    ok = sum(1 for e in run.exchanges if e.record.ok)
    print(f"  [{run.path} round {run.round}] {run.scenario}: {ok}/{len(run.exchanges)} turns ok in "
          f"{run.wall_s:.1f} s (load avg {run.loadavg_before[0]:.1f} -> {run.loadavg_after[0]:.1f})",
          flush=True)


# ---------------------------------------------------------------------------
# After the run: cache estimate and summaries
# ---------------------------------------------------------------------------

def fill_estimates(run: Run, tokens: Tokens, block: int, max_model_len: int) -> None:
    """Per turn: the user message's size and the best prefix-cache hit the previous turn allows.

    Rapport's window is recomputed here from the conversation as the client saw
    it (same function, tokenizer and limits as the server), after the run so
    that tokenising does not compete with the measurement.
    """
    by_user: dict[int, list[Exchange]] = {}
    for ex in run.exchanges:
        by_user.setdefault(ex.record.user, []).append(ex)
    for exs in by_user.values():
        history: list[PastTurn] = []
        prev_ids: list[int] | None = None
        for ex in sorted(exs, key=lambda e: e.record.turn):
            rec = ex.record
            rec.user_message_tokens = len(tokens.text_ids(ex.user_text))
            if not rec.ok:
                if ex.window and rec.prompt_tokens is None:
                    rec.needed_prompt_tokens = len(tokens.prompt_ids(ex.window))
                continue  # neither side keeps a failed turn in the conversation
            if run.path == "rapport":
                ex.window = window_for("rapport", history, ex.user_text, max_model_len - run.max_tokens, tokens)
            ids = tokens.prompt_ids(ex.window)
            if prev_ids is not None:
                common = 0
                for a, b in zip(prev_ids, ids, strict=False):  # a common prefix: the shorter one bounds it
                    if a != b:
                        break
                    common += 1
                # vLLM always computes a prompt's last token, and caches whole blocks only.
                usable = min(common, len(prev_ids) - 1, len(ids) - 1)
                rec.ideal_cached_tokens = max(0, usable) // block * block
            prev_ids = ids + tokens.text_ids(ex.reply)
            history.append(PastTurn(ex.user_text, ex.reply))


def summarize(run: Run) -> dict[str, Any]:
    recs = [e.record for e in run.exchanges]
    ok = [r for r in recs if r.ok]
    ttft = sorted(r.ttft_ms for r in ok if r.ttft_ms is not None)
    gaps = sorted(g for r in ok for g in r.gaps_ms)
    tokens = sum(r.completion_tokens for r in ok)
    deltas = sum(r.deltas for r in ok)
    later = [r for r in ok if r.turn >= 2 and r.prompt_tokens]
    prompt = sum(int(r.prompt_tokens or 0) for r in later)
    cached = sum(int(r.cached_tokens or 0) for r in later)
    ideal = [r for r in later if r.ideal_cached_tokens is not None]
    per_turn: dict[int, dict[str, Any]] = {}
    for r in ok:
        slot = per_turn.setdefault(r.turn, {"prompt": 0, "cached": 0, "ideal": 0, "n": 0})
        slot["prompt"] += int(r.prompt_tokens or 0)
        slot["cached"] += int(r.cached_tokens or 0)
        slot["ideal"] += int(r.ideal_cached_tokens or 0)
        slot["n"] += 1
    return {
        "path": run.path, "scenario": run.scenario, "round": run.round, "users": run.users,
        "turns": len(recs), "turns_ok": len(ok),
        "errors": [f"user {r.user} turn {r.turn}: {r.error}" for r in recs if not r.ok],
        "wall_s": run.wall_s,
        "ttft_ms": {"p50": percentile(ttft, 50, presorted=True), "p95": percentile(ttft, 95, presorted=True),
                    "mean": sum(ttft) / len(ttft) if ttft else None, "n": len(ttft)},
        "gap_ms": {"p50": percentile(gaps, 50, presorted=True), "p95": percentile(gaps, 95, presorted=True),
                   "n": len(gaps)},
        "completion_tokens": tokens,
        "deltas": deltas,
        "tokens_per_delta": tokens / deltas if deltas else None,
        "output_tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else None,
        "cache_share_turn2plus": cached / prompt if prompt else None,
        "ideal_cache_share_turn2plus": (sum(int(r.ideal_cached_tokens or 0) for r in ideal)
                                        / sum(int(r.prompt_tokens or 0) for r in ideal)) if ideal else None,
        "cache_share_by_turn": {str(k): (v["cached"] / v["prompt"] if v["prompt"] else None)
                                for k, v in sorted(per_turn.items())},
        "finish_reasons": _count(r.finish_reason for r in ok),
        "server_ttft_ms_p50": percentile(sorted(r.server_ttft_ms for r in ok if r.server_ttft_ms is not None), 50),
        "loadavg_before": run.loadavg_before, "loadavg_after": run.loadavg_after,
    }


def pooled(runs: list[Run], path: str, scenario: str) -> Run | None:
    chosen = [r for r in runs if r.path == path and r.scenario == scenario]
    if not chosen:
        return None
    return Run(path, scenario, 0, chosen[0].users, chosen[0].max_tokens, sum(r.wall_s for r in chosen),
               chosen[0].loadavg_before, chosen[-1].loadavg_after,
               [e for r in chosen for e in r.exchanges])


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _f(v: float | None, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{(a / b - 1) * 100:+.1f}%"


def format_tables(summaries: list[dict[str, Any]], pooled_summaries: list[dict[str, Any]],
                  long_rows: list[dict[str, Any]], args: argparse.Namespace, block: int) -> str:
    lines = [(f"Concurrency runs: {args.turns} turns per user, max_tokens {args.max_tokens}, temperature 0, "
             f"think {args.think_ms:g} ms, KV block {block}"),
             "",
             (f"{'users':>5} {'round':>5}  {'path':<8}{'turns':>6}{'TTFT p50':>10}{'p95':>8}{'gap p50':>9}"
             f"{'p95':>7}{'tok/delta':>10}{'out tok/s':>10}{'cache t2+':>10}{'ideal':>7}{'load':>6}")]
    for s in summaries:
        if s["scenario"] == "long":
            continue
        lines.append(
            f"{s['users']:>5} {s['round'] or 'all':>5}  {s['path']:<8}{str(s['turns_ok']) + '/' + str(s['turns']):>6}"
            f"{_f(s['ttft_ms']['p50']):>10}{_f(s['ttft_ms']['p95']):>8}{_f(s['gap_ms']['p50']):>9}"
            f"{_f(s['gap_ms']['p95']):>7}{_f(s['tokens_per_delta'], '.2f'):>10}"
            f"{_f(s['output_tokens_per_s'], '.1f'):>10}{_pct(s['cache_share_turn2plus']):>10}"
            f"{_pct(s['ideal_cache_share_turn2plus']):>7}{_f(s['loadavg_before'][0], '.1f'):>6}")
    lines += ["", "Rapport against vLLM's own server (all rounds pooled; TTFT: + means Rapport is slower)", "",
              (f"{'users':>5}  {'TTFT p50':>9}{'TTFT p95':>10}{'gap p50':>9}{'tok/s':>8}"
              f"{'cache R':>9}{'cache V':>9}   goal (TTFT p50 and p95 within 5%, tok/s >= vLLM, cache >= 90%)")]
    by = {(s["path"], s["scenario"]): s for s in pooled_summaries}
    for c in args.concurrency:
        r, v = by.get(("rapport", f"c{c}")), by.get(("vllm", f"c{c}"))
        if r is None or v is None:
            continue
        ttft50 = _ratio(r["ttft_ms"]["p50"], v["ttft_ms"]["p50"])
        ttft95 = _ratio(r["ttft_ms"]["p95"], v["ttft_ms"]["p95"])
        tps = _ratio(r["output_tokens_per_s"], v["output_tokens_per_s"])
        checks = [
            ("TTFT", ttft50 is not None and ttft95 is not None and ttft50 <= 1.05 and ttft95 <= 1.05),
            ("tok/s", tps is not None and tps >= 1.0),
            ("cache", (r["cache_share_turn2plus"] or 0) >= 0.9),
        ]
        verdict = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks)
        lines.append(
            f"{c:>5}  {_delta(r['ttft_ms']['p50'], v['ttft_ms']['p50']):>9}"
            f"{_delta(r['ttft_ms']['p95'], v['ttft_ms']['p95']):>10}"
            f"{_delta(r['gap_ms']['p50'], v['gap_ms']['p50']):>9}"
            f"{_f(tps, '.3f') if tps is not None else '-':>8}"
            f"{_pct(r['cache_share_turn2plus']):>9}{_pct(v['cache_share_turn2plus']):>9}   {verdict}")
    by_turn = []
    for c in args.concurrency:
        for path in ("rapport", "vllm"):
            s = by.get((path, f"c{c}"))
            if s is not None:
                shares = " ".join(f"t{k}={_pct(v)}" for k, v in s["cache_share_by_turn"].items() if k != "1")
                by_turn.append(f"{c:>5}  {path:<8} {shares}")
    if by_turn:
        lines += ["", "Prefix-cache share by turn (pooled over users and rounds)", *by_turn]
    if long_rows:
        lines += ["", (f"Long conversation: 1 user, {args.long_turns} turns of ~{args.long_message_tokens}-token "
                  f"messages, max_tokens {args.long_max_tokens}, context {args.max_model_len}"),
                  ("(prompt tokens / cached / share; vllm = Rapport's window sent to vLLM's server, "
                  "vllm-full = whole history; ideal = best block-aligned hit)"), ""]
        paths = [p for p in ("rapport", "vllm", "vllm-full") if any(p in row for row in long_rows)]
        head = f"{'round':>5} {'turn':>4} {'msg':>4}" + "".join(f"  {p:>24}" for p in paths) + f"  {'ideal':>6}"
        lines.append(head)
        for row in long_rows:
            cells = ""
            for p in paths:
                rec = row.get(p)
                if rec is None:
                    cells += f"  {'-':>24}"
                elif not rec["ok"]:
                    why = (f"rejected: {rec['needed_prompt_tokens']} tok" if rec.get("needed_prompt_tokens")
                           else "failed: " + (rec["error"] or "")[:14])
                    cells += f"  {why:>24}"
                else:
                    share = (rec["cached_tokens"] or 0) / rec["prompt_tokens"] if rec["prompt_tokens"] else None
                    cell = f"{rec['prompt_tokens']} / {rec['cached_tokens']} / {_pct(share)}"
                    cells += f"  {cell:>24}"
            ref = row.get("rapport") or row.get("vllm")
            ideal = None
            if ref and ref["ok"] and ref["ideal_cached_tokens"] is not None and ref["prompt_tokens"]:
                ideal = ref["ideal_cached_tokens"] / ref["prompt_tokens"]
            lines.append(f"{row['round']:>5} {row['turn']:>4} {_f(row.get('msg_tokens')):>4}{cells}  {_pct(ideal):>6}")
        for s in pooled_summaries:
            if s["scenario"] == "long":
                lines.append(f"  {s['path']:<10} turns 2+: cache share {_pct(s['cache_share_turn2plus'])} "
                             f"(ideal {_pct(s['ideal_cache_share_turn2plus'])}), TTFT p50 {_f(s['ttft_ms']['p50'])} ms"
                             f" p95 {_f(s['ttft_ms']['p95'])} ms, {s['turns_ok']}/{s['turns']} turns ok")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def long_table(runs: list[Run]) -> list[dict[str, Any]]:
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for run in runs:
        if run.scenario != "long":
            continue
        for ex in run.exchanges:
            r = ex.record
            row = rows.setdefault((run.round, r.turn), {"round": run.round, "turn": r.turn})
            if r.user_message_tokens is not None and run.path != "vllm-full":
                row["msg_tokens"] = r.user_message_tokens
            row[run.path] = {"ok": r.ok, "error": r.error, "prompt_tokens": r.prompt_tokens,
                             "cached_tokens": r.cached_tokens, "ideal_cached_tokens": r.ideal_cached_tokens,
                             "needed_prompt_tokens": r.needed_prompt_tokens,
                             "ttft_ms": r.ttft_ms}
    return [rows[k] for k in sorted(rows)]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated user counts (default 1,4,8)")
    p.add_argument("--turns", type=int, default=5, help="turns per user (default 5)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every turn (default 32)")
    p.add_argument("--think-ms", type=float, default=0.0, help="fixed pause between a user's turns (default 0)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the whole set, alternating which server goes first (default 1)")
    p.add_argument("--no-long", dest="long", action="store_false", help="skip the long-conversation run")
    p.add_argument("--long-turns", type=int, default=12, help="turns of the long conversation (default 12)")
    p.add_argument("--long-message-tokens", type=int, default=250,
                   help="size of each long user message in tokens (default 250)")
    p.add_argument("--long-max-tokens", type=int, default=16, help="max_tokens in the long run (default 16)")
    p.add_argument("--skip-vllm-server", action="store_true", help="measure only Rapport")
    p.add_argument("--skip-rapport", action="store_true", help="measure only vLLM's own server")
    p.add_argument("--model", default=None, help="model folder (default: the small model the project prepares)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context window on both servers (default 2048)")
    p.add_argument("--kv-cache-gib", default=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   help="VLLM_CPU_KVCACHE_SPACE for both servers (default $VLLM_CPU_KVCACHE_SPACE or 1)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"KV cache block size on both servers (default: vLLM's, {CPU_DEFAULT_BLOCK_SIZE} on CPU)")
    p.add_argument("--redis-url", default=REDIS_URL, help=f"Redis for Rapport (default {REDIS_URL})")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="per server start (default 600)")
    p.add_argument("--turn-timeout-s", type=float, default=600.0, help="per turn (default 600)")
    p.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a new temp folder)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write every figure as JSON")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    if not args.concurrency or min(args.concurrency) < 1 or args.turns < 1 or args.repeat < 1:
        p.error("--concurrency needs positive counts; --turns and --repeat must be >= 1")
    if args.skip_rapport and args.skip_vllm_server:
        p.error("nothing to do: both paths skipped")
    if args.model is None:
        from server.model_prep import default_model_dir

        args.model = str(default_model_dir())
    return args


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.model).is_dir():
        print(f"model folder {args.model} does not exist (run `rapport prepare-model`)", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="vllm-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    block = args.block_size or CPU_DEFAULT_BLOCK_SIZE
    served_name = Path(args.model.rstrip("/")).name
    tokens = Tokens(args.model)
    long_tokens = tokens if args.long else None
    paths = [p for p in PATHS if not (p == "rapport" and args.skip_rapport)
             and not (p == "vllm" and args.skip_vllm_server)]
    print(f"model {served_name}, float32, max_model_len {args.max_model_len}, KV cache {args.kv_cache_gib} GiB, "
          f"block {block}; {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; logs in {log_dir}",
          flush=True)

    runs: list[Run] = []
    startups: list[dict[str, Any]] = []
    prefixes: list[str] = []
    current: ChildServer | None = None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for round_no in range(1, args.repeat + 1):
            order = paths if round_no % 2 == 1 else list(reversed(paths))
            for path in order:
                if path == "rapport":
                    prefix = f"vllm-compare:{uuid.uuid4().hex[:10]}:"
                    prefixes.append(prefix)
                    current = rapport_server(args, log_dir, prefix, round_no)
                else:
                    current = vllm_server(args, log_dir, served_name, round_no)
                print(f"round {round_no}: starting {path} ...", flush=True)
                current.start(timeout=args.startup_timeout_s)
                startups.append({"path": path, "round": round_no, "startup_s": current.startup_s})
                print(f"round {round_no}: {path} ready after {current.startup_s:.0f} s", flush=True)
                base = current.base
                if path == "rapport":
                    got = run_async(drive_rapport(args, base, round_no, long_tokens))
                else:
                    got = run_async(drive_vllm(args, base, served_name, round_no, long_tokens))
                runs.extend(got)
                current.stop(timeout=STOP_TIMEOUT_S)
                current = None
    except KeyboardInterrupt:
        print("interrupted; stopping the server", file=sys.stderr)
        return 130
    finally:
        if current is not None:
            current.stop(timeout=STOP_TIMEOUT_S)
        for prefix in prefixes:
            try:
                clean_prefix(prefix, args.redis_url)
            except redis.RedisError as exc:  # leftover keys are only litter
                print(f"could not clean Redis prefix {prefix}: {exc}", file=sys.stderr)

    for run in runs:
        fill_estimates(run, tokens, block, args.max_model_len)
    summaries = [summarize(r) for r in runs]
    pooled_summaries = []
    for scenario in [f"c{c}" for c in args.concurrency] + (["long"] if args.long else []):
        for path in ("rapport", "vllm", "vllm-full"):
            pr = pooled(runs, path, scenario)
            if pr is not None:
                pooled_summaries.append(summarize(pr))
    shown = summaries + ([s for s in pooled_summaries if s["scenario"] != "long"] if args.repeat > 1 else [])
    shown.sort(key=lambda s: (s["users"], s["scenario"], s["round"] or 99, s["path"]))
    long_rows = long_table(runs)
    print()
    print(format_tables(shown, pooled_summaries, long_rows, args, block))
    if args.json_path:
        report = {
            "config": {k: v for k, v in vars(args).items() if k != "json_path"} | {"block_size_effective": block},
            "machine": {"cpus": os.cpu_count()},
            "startups": startups,
            "runs": summaries,
            "pooled": pooled_summaries,
            "long_conversation": long_rows,
            "turns": [{k: v for k, v in asdict(e.record).items() if k != "text"} | {"reply": e.record.text}
                      for r in runs for e in r.exchanges],
        }
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"\nJSON written to {args.json_path}")
    failed = sum(1 for r in runs if r.scenario != "long" for e in r.exchanges if not e.record.ok)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
