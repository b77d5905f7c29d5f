"""In-process vLLM engine (``vllm.v1.engine.async_llm.AsyncLLM``).

The gateway talks to vLLM's async engine directly, without an HTTP hop: the
prompt is rendered with the model's own chat template, tokenised here (so
:meth:`VllmEngine.count_tokens` is exact), and streamed back as deltas.

vLLM is imported lazily so this module imports on machines without it. Its
engine core runs in a spawned subprocess, so a script that starts this engine
must guard its entry point with ``if __name__ == "__main__":``.

CPU hosts: ``enforce_eager`` is on by default (``engine_args`` can override
it); ``dtype="auto"`` becomes float32 for float32 checkpoints and on
processors without native bfloat16 (AVX-512 BF16 / AMX); and
``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 unless set. The small default
model (``server/model_prep.py``) runs with ``dtype="float32"`` and
``max_model_len=2048``.

LoRA adapters (``EngineRequest.lora``): with ``lora_dir`` holding peft
adapter folders (see :mod:`server.lora_prep`), or ``enable_lora=True``, vLLM
starts with multi-LoRA on (``enable_lora``, ``max_loras``, ``max_lora_rank``;
vLLM's CPU backend serves them with its Punica CPU kernels). A request naming
an adapter runs with a ``LoRARequest`` whose id is fixed per name for the
engine's life; a name with no adapter folder, or an adapter whose rank is over
``max_lora_rank``, is refused with BadRequest before anything reaches vLLM, so
it never touches other users' requests. LoRA stays off (it reserves memory for
``max_loras`` adapters) unless the folder holds adapters at start or
``enable_lora`` says so; with it on, adapters added to the folder later are
served without a restart.

vLLM's own output (its configuration dump at start, progress bars, its
messages at exit) goes to ``log_file`` when one is given: see
:func:`route_vllm_log`.

Finish reasons: "stop" and "length" as usual; a request ended through
:meth:`VllmEngine.abort` finishes with "abort". An abort vLLM decides on its
own (or one caused by :meth:`VllmEngine.close`) raises EngineError.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import BadRequest, EngineError, RapportError, TooLarge, Unavailable
from server.engines.base import (
    Engine,
    EngineDelta,
    EngineEvent,
    EngineFinish,
    EngineLoad,
    EngineRequest,
    SamplingOptions,
    finish_reason_from_vllm,
)
from server.engines.chat_template import ChatTemplate, template_text
from server.engines.latency import RecentLatency
from server.lora_prep import adapter_rank, find_adapter, is_valid_name, list_adapters
from sessions.messages import ChatMessage

log = logging.getLogger(__name__)

#: Default KV cache size on CPU hosts (GiB), unless VLLM_CPU_KVCACHE_SPACE is set.
DEFAULT_CPU_KVCACHE_GIB = "1"
#: Default batch capacity if neither the caller nor vLLM's config gives one.
_FALLBACK_MAX_NUM_SEQS = 256


@dataclass(slots=True)
class _SchedulerView:
    """The latest numbers vLLM's scheduler reported (via the stat logger)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0  # cumulative prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # cumulative prompt tokens found there
    updated_at: float = 0.0  # time.monotonic() of the last report


def _make_stat_logger_factory(view: _SchedulerView):
    """A vLLM stat-logger factory that copies SchedulerStats into ``view``.

    vLLM calls ``record`` from AsyncLLM's output handler (same event loop) after
    every engine step, with the scheduler's running/waiting counts.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _RapportStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is None:
                return
            view.running = int(getattr(scheduler_stats, "num_running_reqs", 0) or 0)
            view.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0) or 0) + int(
                getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0
            )
            view.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
            pcs = getattr(scheduler_stats, "prefix_cache_stats", None)
            if pcs is not None:
                if getattr(pcs, "reset", False):
                    view.prefix_queries = view.prefix_hits = 0
                view.prefix_queries += int(getattr(pcs, "queries", 0) or 0)
                view.prefix_hits += int(getattr(pcs, "hits", 0) or 0)
            view.updated_at = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    def factory(vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        return _RapportStatLogger(vllm_config, engine_index)

    return factory


class VllmEngine(Engine):
    """vLLM's AsyncLLM in this process (engine core in a child process)."""

    def __init__(
        self,
        model: str,
        max_model_len: int | None = None,
        dtype: str = "auto",
        max_num_seqs: int | None = None,
        engine_args: dict[str, Any] | None = None,
        served_model_name: str | None = None,
        *,
        lora_dir: str | Path | None = None,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        log_file: str | Path | None = None,
    ) -> None:
        self._model = str(model)
        self._lora_dir = Path(lora_dir) if lora_dir else None
        self._lora_forced = bool(enable_lora)
        self._max_loras = int(max_loras)
        self._max_lora_rank = int(max_lora_rank)
        # Decided in start(): whether vLLM runs with LoRA on.
        self._lora_enabled = False
        # Adapter name -> the LoRARequest id vLLM caches its weights under.
        self._lora_ids: dict[str, int] = {}
        #: Where vLLM's own log goes (None: vLLM's default, the console).
        self.log_file = Path(log_file) if log_file else None
        self._requested_max_model_len = max_model_len
        self._dtype = dtype
        self._requested_max_num_seqs = max_num_seqs
        self._extra_args = dict(engine_args or {})
        self._served_model_name = served_model_name
        self.model_name = served_model_name or Path(self._model.rstrip("/")).name or self._model
        if max_model_len:
            self.max_model_len = max_model_len

        self._llm: Any = None
        self._template: ChatTemplate | None = None
        self._ready = False
        self._closing = False
        self._max_num_seqs = max_num_seqs or _FALLBACK_MAX_NUM_SEQS
        self._sched = _SchedulerView()
        # Requests this adapter is streaming: request_id -> count (ids may repeat).
        self._active: dict[str, int] = {}
        # Ids aborted through abort(); their "abort" finish is expected.
        self._aborted: set[str] = set()
        # Background requests (priority > 0) among those streaming, and whether
        # vLLM runs the priority policy (a priority other than 0 is an error
        # under "fcfs", which --vllm-arg scheduling_policy=fcfs may choose).
        self._background = 0
        self._priority_scheduling = False
        self._latency = RecentLatency()
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        #: Seconds :meth:`start` took (engine build + warm-up), for logs and tests.
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def _build_engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs: dict[str, Any] = {
            "model": self._model,
            "dtype": self._dtype,
            "enable_prefix_caching": True,
            # Stats feed load(); the stat logger needs them on.
            "disable_log_stats": False,
            # User turns (priority 0) go before background work such as
            # conversation summaries (EngineRequest.priority); the CPU backend
            # runs vLLM's own scheduler, which supports it.
            "scheduling_policy": "priority",
        }
        if self._requested_max_model_len:
            kwargs["max_model_len"] = self._requested_max_model_len
        if self._requested_max_num_seqs:
            kwargs["max_num_seqs"] = self._requested_max_num_seqs
        if self._served_model_name:
            kwargs["served_model_name"] = self._served_model_name
        if self._lora_enabled:
            kwargs["enable_lora"] = True
            kwargs["max_loras"] = self._max_loras
            kwargs["max_lora_rank"] = self._max_lora_rank
        if _on_cpu():
            # torch.compile needs triton-cpu, which the CPU wheel lacks; eager
            # mode starts faster and runs the same kernels.
            kwargs["enforce_eager"] = True
            # vLLM turns "auto" into bfloat16 on CPU. Keep float32 when the
            # checkpoint is float32 (the converted default model: in bf16 its
            # replies visibly degrade) or when the processor has no native
            # bf16 (there bf16 ran 3.5x slower than float32).
            if self._dtype == "auto" and (
                _checkpoint_dtype(self._model) == "float32" or not _cpu_has_native_bf16()
            ):
                kwargs["dtype"] = "float32"
        kwargs.update(self._extra_args)
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        if self._llm is not None:
            return
        t0 = time.monotonic()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        if self.log_file is not None:
            route_vllm_log(self.log_file)
            log.info("vLLM's own log goes to %s (--log-level debug shows it here)", self.log_file)
        self._lora_enabled = self._lora_forced or bool(self.lora_adapters())
        if self._lora_enabled:
            log.info("LoRA adapters in %s: %s", self._lora_dir, ", ".join(self.lora_adapters()) or "none yet")
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise Unavailable(
                f"vLLM is not installed ({exc}); run scripts/install-vllm.sh VENV_DIR"
            ) from exc

        args = self._build_engine_args()
        factory = _make_stat_logger_factory(self._sched)
        try:
            # Building the engine blocks for tens of seconds (model load, KV
            # cache profiling); run it in a thread so the event loop stays
            # responsive. AsyncLLM starts its output handler lazily on the
            # first request when built outside a running loop.
            building = asyncio.ensure_future(
                asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[factory])
            )
            try:
                self._llm = await asyncio.shield(building)
            except asyncio.CancelledError:
                # The thread cannot be interrupted; shut the engine down as
                # soon as it exists instead of leaking its child processes.
                building.add_done_callback(_shutdown_when_built)
                raise
        except Exception as exc:
            raise Unavailable(f"vLLM failed to start with model {self._model!r}: {exc}") from exc

        try:
            cfg = self._llm.vllm_config
            self.max_model_len = int(cfg.model_config.max_model_len)
            self._max_num_seqs = int(
                getattr(cfg.scheduler_config, "max_num_seqs", None) or self._max_num_seqs
            )
            self._priority_scheduling = str(getattr(cfg.scheduler_config, "policy", "")) == "priority"
            tokenizer = await self._load_tokenizer()
            self._template = ChatTemplate(tokenizer, template_text(tokenizer, self._model))
            await self._warm_up()
        except BaseException:
            await self._shutdown_engine()
            raise
        self._ready = True
        self.start_seconds = time.monotonic() - t0
        log.info(
            "vLLM engine ready: model=%s max_model_len=%d max_num_seqs=%d in %.1fs",
            self.model_name, self.max_model_len, self._max_num_seqs, self.start_seconds,
        )

    async def _load_tokenizer(self) -> Any:
        tok = None
        try:
            tok = self._llm.get_tokenizer()
            if inspect.isawaitable(tok):
                tok = await tok
        except Exception:  # older/newer vLLM layouts
            log.debug("vLLM's tokenizer is unavailable; loading it with transformers", exc_info=True)
            tok = None
        if tok is not None and hasattr(tok, "apply_chat_template") and hasattr(tok, "encode"):
            return tok
        from transformers import AutoTokenizer

        return await asyncio.to_thread(AutoTokenizer.from_pretrained, self._model)

    async def _warm_up(self) -> None:
        request = EngineRequest(
            request_id=f"warmup-{os.getpid()}-{time.monotonic_ns()}",
            messages=(ChatMessage("user", "Say hello."),),
            sampling=SamplingOptions(temperature=0.0, max_tokens=4),
        )
        finish = None
        async for event in self._stream(request, record=False):
            if isinstance(event, EngineFinish):
                finish = event
        if finish is None or finish.completion_tokens + finish.prompt_tokens <= 0:
            raise Unavailable("vLLM warm-up generation produced nothing")

    async def close(self) -> None:
        self._ready = False
        self._closing = True
        if self._llm is None:
            return
        active = list(self._active)
        if active:
            try:
                await self._llm.abort(active)
            except Exception:
                log.debug("abort during close failed", exc_info=True)
        await self._shutdown_engine()

    async def _shutdown_engine(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stop AsyncLLM's output handler first: shutdown() runs in a thread
        # (it blocks for seconds), and a handler still running on this loop
        # would see the engine core die and log it as a failure.
        handler = getattr(llm, "output_handler", None)
        if isinstance(handler, asyncio.Task) and not handler.done():
            handler.cancel()
            try:
                await handler
            except asyncio.CancelledError:
                pass
            except Exception:
                log.debug("vLLM output handler ended with an error", exc_info=True)
        try:
            await asyncio.to_thread(llm.shutdown)
        except Exception:
            log.warning("vLLM shutdown failed", exc_info=True)
        # AsyncLLM.__del__ calls shutdown() again. Something inside vLLM keeps
        # the object alive until interpreter exit, where that second call
        # fails against half-unloaded modules ("Exception ignored in
        # AsyncLLM.__del__"). It is shut down already: make the repeat a no-op.
        try:
            llm.shutdown = _already_shut_down
        except Exception:  # a slotted or frozen object: keep vLLM's
            log.debug("cannot neutralise AsyncLLM.shutdown", exc_info=True)

    @property
    def ready(self) -> bool:
        llm = self._llm
        return self._ready and llm is not None and not getattr(llm, "errored", False)

    # ------------------------------------------------------------------ prompts

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        if self._template is None:
            return super().count_tokens(messages)
        return self._template.count_tokens(messages)

    @staticmethod
    def _engine_prompt(token_ids: list[int], text: str) -> Any:
        try:  # vLLM >= 0.2x: an already-rendered input skips the raw-prompt path
            from vllm.inputs.engine import tokens_input

            return tokens_input(token_ids, prompt=text)
        except ImportError:  # pragma: no cover - older vLLM
            return {"prompt_token_ids": token_ids, "prompt": text}

    # ------------------------------------------------------------------ generation

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        # Background requests wait behind user turns by design; their timings
        # would skew the medians admission control reads.
        return self._stream(request, record=request.priority <= 0)

    async def _stream(self, request: EngineRequest, *, record: bool) -> AsyncIterator[EngineEvent]:
        if self._llm is None or self._closing:
            raise Unavailable("the vLLM engine is not running")
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if self._template is None:
            raise Unavailable("the vLLM engine is not started")
        s = request.sampling
        prompt = self._template.render(request.messages, s.enable_thinking)
        token_ids = self._template.encode(prompt)
        if len(token_ids) >= self.max_model_len:
            raise TooLarge(
                f"the conversation is {len(token_ids)} tokens; the model's context holds "
                f"{self.max_model_len}"
            )
        max_tokens = max(1, min(s.max_tokens, self.max_model_len - len(token_ids)))
        try:
            params = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=max_tokens,
                seed=s.seed,
                stop=list(s.stop) or None,
                ignore_eos=s.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError) as exc:
            raise EngineError(f"invalid sampling options: {exc}") from exc

        rid = request.request_id
        t_start = time.monotonic()
        t_first: float | None = None
        t_last: float | None = None
        sent_tokens = 0  # tokens delivered in deltas
        pending_tokens = 0  # tokens whose text has not appeared yet
        prompt_tokens = len(token_ids)
        cached = 0
        engine_ttft_ms: float | None = None
        vllm_reason: str | None = None
        finished = False

        lora_request = self._lora_request(request.lora)
        self._active[rid] = self._active.get(rid, 0) + 1
        background = request.priority > 0
        self._background += background
        priority = request.priority if self._priority_scheduling else 0
        stream = self._llm.generate(self._engine_prompt(token_ids, prompt), params, request_id=rid,
                                    lora_request=lora_request, priority=priority)
        try:
            try:
                async for out in stream:
                    if out.prompt_token_ids:
                        prompt_tokens = len(out.prompt_token_ids)
                    if out.num_cached_tokens:
                        cached = int(out.num_cached_tokens)
                    if engine_ttft_ms is None:
                        engine_ttft_ms = _engine_ttft_ms(getattr(out, "metrics", None))
                    for comp in out.outputs[:1]:
                        pending_tokens += len(comp.token_ids)
                        if comp.finish_reason is not None:
                            vllm_reason = comp.finish_reason
                        if comp.text:
                            now = time.monotonic()
                            if t_first is None:
                                t_first = now
                            t_last = now
                            n, pending_tokens = pending_tokens, 0
                            sent_tokens += n
                            yield EngineDelta(comp.text, tokens=n)
                    if out.finished:
                        finished = True
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except RapportError:
                raise
            except Exception as exc:
                finished = True  # vLLM aborted it on its way out
                raise EngineError(f"vLLM failed while generating: {type(exc).__name__}: {exc}") from exc

            if not finished:
                raise EngineError("vLLM ended the stream without finishing the request")
            if vllm_reason == "error":
                raise EngineError("vLLM reported an internal error for this request")
            if vllm_reason == "abort":
                if rid not in self._aborted:
                    why = "the engine is shutting down" if self._closing else "vLLM aborted the request"
                    raise EngineError(why)
                reason = "abort"
            else:
                reason = finish_reason_from_vllm(vllm_reason)
            if record:
                self._record(t_start, t_first, t_last, sent_tokens, prompt_tokens, cached)
            # Tokens that never produced text (the end-of-sequence token, a
            # stop string's tokens) are not counted: completion_tokens is what
            # the deltas carried.
            yield EngineFinish(
                finish_reason=reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=sent_tokens,
                cached_prompt_tokens=cached,
                engine_ttft_ms=engine_ttft_ms,
            )
        finally:
            # vLLM's generate() aborts its request when it is closed or
            # cancelled; close it explicitly (it would otherwise wait for GC),
            # and abort by id as well in case it never reached its own handler.
            # Bookkeeping first: the awaits below can be interrupted by a
            # second cancellation.
            self._background -= background
            left = self._active.get(rid, 0) - 1
            if left > 0:
                self._active[rid] = left
            else:
                self._active.pop(rid, None)
                self._aborted.discard(rid)
            try:
                await stream.aclose()
            except Exception:
                log.debug("closing vLLM's stream for %s failed", rid, exc_info=True)
            if not finished and self._llm is not None:
                try:
                    await self._llm.abort(rid)
                except Exception:
                    log.debug("abort of %s failed", rid, exc_info=True)

    # ------------------------------------------------------------------ LoRA

    def lora_adapters(self) -> list[str]:
        """The adapters in the LoRA folder (none when LoRA is off or there is no folder)."""
        if self._lora_dir is None or (self._llm is not None and not self._lora_enabled):
            return []
        return list_adapters(self._lora_dir)

    def check_lora(self, name: str | None) -> None:
        self._lora_request(name)

    def _lora_request(self, name: str | None) -> Any:
        """vLLM's LoRARequest for adapter ``name`` (None: the base model); BadRequest if it cannot run."""
        if name is None:
            return None
        shown = name if is_valid_name(name) else name[:64]
        folder = find_adapter(self._lora_dir, name) if self._lora_dir is not None else None
        if folder is None:
            raise BadRequest(f"unknown LoRA adapter {shown!r}")
        if not self._lora_enabled:
            raise BadRequest(f"LoRA adapter {name!r} was added after the engine started without LoRA; "
                             "restart the server (or start it with --enable-lora)")
        rank = adapter_rank(folder)
        if rank is not None and rank > self._max_lora_rank:
            raise BadRequest(f"LoRA adapter {name!r} has rank {rank}, over --max-lora-rank "
                             f"{self._max_lora_rank}")
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(name, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(folder))

    def _record(
        self,
        t_start: float,
        t_first: float | None,
        t_last: float | None,
        completion_tokens: int,
        prompt_tokens: int,
        cached: int,
    ) -> None:
        self._prompt_tokens_total += prompt_tokens
        self._cached_tokens_total += cached
        self._latency.add_stream(t_start, t_first, t_last, completion_tokens)

    async def abort(self, request_id: str) -> None:
        if self._llm is None:
            return
        if request_id in self._active:
            self._aborted.add(request_id)
        try:
            await self._llm.abort(request_id)
        except Exception:
            log.debug("abort of %s failed", request_id, exc_info=True)

    # ------------------------------------------------------------------ load

    def load(self) -> EngineLoad:
        inflight = sum(self._active.values())
        # vLLM reports scheduler stats only after an engine step, so after the
        # last request finishes (or is aborted) the last report can still show
        # it running. The adapter's own count of open streams bounds it.
        running = min(self._sched.running, inflight)
        waiting = max(0, inflight - running)
        return EngineLoad(
            running=running,
            waiting=waiting,
            max_num_seqs=self._max_num_seqs,
            recent_ttft_ms=self._latency.ttft_ms(),
            recent_itl_ms=self._latency.itl_ms(),
            # vLLM does not say which requests wait; under the priority policy
            # the background ones are the first to wait (and to be preempted).
            background=self._background,
            background_waiting=min(waiting, self._background) if self._priority_scheduling else 0,
        )

    def scheduler_stats(self) -> dict[str, float]:
        """vLLM's last raw scheduler report (for metrics and tests)."""
        s = self._sched
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "age_s": (time.monotonic() - s.updated_at) if s.updated_at else float("inf"),
        }

    def unfinished_requests(self) -> int:
        """Requests vLLM's front end still tracks (0 once every abort landed)."""
        if self._llm is None:
            return 0
        return int(self._llm.get_num_unfinished_requests())

    def prefix_cache_hit_share(self) -> float | None:
        """Share of prompt tokens served from the prefix cache, over finished turns."""
        if self._prompt_tokens_total <= 0:
            return None
        return self._cached_tokens_total / self._prompt_tokens_total


#: The interpreter multiprocessing spawned with before route_vllm_log replaced it.
_spawn_python: str | None = None
#: The logging configurations route_vllm_log wrote (VLLM_LOGGING_CONFIG_PATH
#: naming another file is the operator's).
_written_configs: set[str] = set()


def route_vllm_log(log_file: Path) -> None:
    """Send what vLLM writes (this process's ``vllm`` logger, everything its children print) to ``log_file``.

    - vLLM configures its logger from ``VLLM_LOGGING_CONFIG_PATH`` when it is
      imported, in this process and in the processes it spawns (they inherit
      the environment), so the configuration is written to a file beside the
      log and named there. It is applied here at once as well, so records
      logged while vLLM is still importing do not reach the console either.
      An operator's own ``VLLM_LOGGING_CONFIG_PATH`` is kept.
    - vLLM's engine core and worker processes also print outside logging
      (tqdm bars, torch's C++ warnings, Python warnings, messages logged
      before their logging is configured, the resource tracker's complaints
      at exit). They are started with multiprocessing's spawn method, whose
      interpreter can be replaced (``multiprocessing.spawn.set_executable``,
      which vLLM's own NUMA binding uses the same way): a two-line shell
      script beside the log starts the real interpreter with its output
      appended to the log. This process's own output stays on the console.
    """
    import logging.config
    import multiprocessing.spawn
    import shlex

    global _spawn_python
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # One run's log: each start begins it afresh (it would otherwise grow forever).
    log_file.write_text(f"vLLM's log, started by Rapport (pid {os.getpid()}) at "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n", encoding="utf-8")
    launcher = log_file.with_name(log_file.stem + "-python.sh")
    if _spawn_python is None:
        _spawn_python = os.fsdecode(multiprocessing.spawn.get_executable())
    python = _spawn_python
    if os.fsdecode(multiprocessing.spawn.get_executable()) != str(launcher):
        launcher.write_text(
            "#!/bin/sh\n# vLLM's child processes, with their output appended to its log (Rapport).\n"
            f"exec {shlex.quote(python)} \"$@\" >> {shlex.quote(str(log_file))} 2>&1\n",
            encoding="utf-8",
        )
        launcher.chmod(0o755)
        multiprocessing.spawn.set_executable(str(launcher))
    config_path = log_file.with_name(log_file.stem + "-logging.json")
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH", "") not in ("", *_written_configs):
        return  # the operator's own
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": {
            "format": "%(levelname)s %(asctime)s pid=%(process)d [%(filename)s:%(lineno)d] %(message)s",
            "datefmt": "%m-%d %H:%M:%S",
        }},
        "handlers": {"vllm_file": {
            "class": "logging.FileHandler", "formatter": "vllm", "filename": str(log_file),
            "mode": "a", "encoding": "utf-8",
        }},
        "loggers": {"vllm": {"handlers": ["vllm_file"], "level": "INFO", "propagate": False}},
    }
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _written_configs.add(str(config_path))
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
    logging.config.dictConfig(config)


def _already_shut_down(timeout: float | None = None) -> None:
    return None


def _shutdown_when_built(fut: asyncio.Future[Any]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    try:
        fut.result().shutdown()
    except Exception:  # pragma: no cover
        log.warning("vLLM shutdown after a cancelled start failed", exc_info=True)


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - no usable platform: not a CPU build
        return False


def _checkpoint_dtype(model: str) -> str | None:
    """The dtype a local model folder's config.json declares, if any."""
    try:
        with open(Path(model) / "config.json", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value) if value else None


def _cpu_has_native_bf16() -> bool:
    """True if the processor computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _engine_ttft_ms(metrics: Any) -> float | None:
    """vLLM's own time to first token for a request, if its metrics carry one."""
    if metrics is None:
        return None
    latency = getattr(metrics, "first_token_latency", 0.0) or 0.0
    if latency > 0:
        return latency * 1000.0
    first = getattr(metrics, "first_token_ts", 0.0) or 0.0
    queued = getattr(metrics, "queued_ts", 0.0) or 0.0
    if first > 0 and queued > 0 and first >= queued:
        return (first - queued) * 1000.0
    return None
