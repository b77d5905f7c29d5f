"""The engine interface every adapter implements.

An engine receives a whole chat (system prompt plus history plus the new user
message) and yields :class:`EngineDelta` items as text is generated, then one
:class:`EngineFinish`. Deltas may carry several tokens. Closing the iterator
(``aclose()``) or cancelling the task that consumes it aborts the request inside
the engine and frees its batch slot; :meth:`Engine.abort` does the same by id.

Engines also report their live load so admission control can estimate the time
to first token before accepting a turn.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from sessions.messages import ChatMessage


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    # Qwen3's chat template switch; passed through only to models that know it.
    enable_thinking: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Used by the remote engine to keep one user on one replica (prefix cache).
    user_id: str = ""
    # The LoRA adapter to generate with (a character's ``lora``, a name the
    # engine serves); None for the base model. An engine that does not serve
    # the name refuses the request with protocol.errors.BadRequest.
    lora: str | None = None
    # Scheduling priority, as vLLM's ``priority``: lower runs first. User turns
    # are 0; background work (conversation summaries, server.summaries) is
    # higher, so a waiting user turn is always scheduled before it.
    priority: int = 0


#: The priority of background requests (``EngineRequest.priority``).
BACKGROUND_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class EngineDelta:
    text: str
    tokens: int = 1


@dataclass(frozen=True, slots=True)
class EngineFinish:
    # "stop" or "length"; anything else (vLLM's "abort") means the engine gave
    # the request up, and the turn ends interrupted.
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    # The engine's own view of time to first token (scheduling + prefill), if
    # it measures one; the gateway's timings are measured separately.
    engine_ttft_ms: float | None = None


EngineEvent = EngineDelta | EngineFinish


def finish_reason_from_vllm(vllm_reason: str | None) -> str:
    """The :class:`EngineFinish` reason of a reply vLLM ended normally.

    "length" stays; "stop" (EOS or a stop string) and "repetition" (vLLM's
    hallucination guard ended the reply) are both a normal end of the reply.
    vLLM's "abort" and "error" are the adapters' to handle before this.
    """
    return "length" if vllm_reason == "length" else "stop"


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A snapshot of the engine's scheduler, for admission control and metrics."""

    running: int
    waiting: int
    max_num_seqs: int
    # Median time to first token over the engine's recent requests, if known.
    recent_ttft_ms: float | None = None
    # Median time per output token while decoding, if known.
    recent_itl_ms: float | None = None
    # Of the above, background requests (priority > 0): in the engine at all,
    # and waiting. A user turn is scheduled before waiting background requests,
    # so admission control does not count them ahead of it.
    background: int = 0
    background_waiting: int = 0


class Engine(abc.ABC):
    """What the gateway needs from a model server."""

    #: Shown to clients as ``ready.model``.
    model_name: str = "unknown"
    #: The model's context window in tokens.
    max_model_len: int = 4096

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and warm it with a real generation."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Abort everything and release the engine."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once :meth:`start` has completed a warm-up generation."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream the reply: deltas, then exactly one :class:`EngineFinish`.

        Raises :class:`protocol.errors.EngineError` if the engine fails mid-way.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request by id; a no-op if it is unknown or finished."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """The scheduler's current state."""

    def lora_adapters(self) -> list[str]:
        """The LoRA adapter names this engine serves now (none by default)."""
        return []

    def check_lora(self, name: str | None) -> None:
        """Raise protocol.errors.BadRequest if a request naming adapter ``name`` cannot run.

        For the turn manager to call before it accepts a turn, so the user
        hears ``bad_request`` instead of a failed turn. The default accepts
        every name: engines without adapters (the simulation) ignore ``lora``.
        """
        return None

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens for ``messages`` after the chat template.

        The default is a rough estimate (4 characters a token) for engines
        without a tokenizer; real engines override it with their tokenizer.
        """
        return sum(len(m.content) // 4 + 4 for m in messages) + 2
