"""One streamed ``POST /v1/chat/completions`` against one OpenAI-compatible vLLM server.

The request asks for server-sent events (``"stream": true``) with a final
usage chunk (``stream_options.include_usage``). Start vLLM with
``--enable-prompt-tokens-details``: without it vLLM leaves
``usage.prompt_tokens_details.cached_tokens`` out and every turn reports 0
cached prompt tokens.

Failures raise :class:`UpstreamFailed`, which says whether the server is to
blame (``down``: connection refused or reset, 5xx, a stream cut short, an
error event) or only this request (a 4xx). A stream that vLLM ended with
``abort`` or ``error`` returns normally, with that finish reason. Cancelling
the caller closes the HTTP response; vLLM sees the disconnect and aborts the
request, freeing its batch slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from server.engines.base import EngineRequest
from server.engines.chat_template import openai_messages


class UpstreamFailed(Exception):
    """One attempt on one server failed; ``down`` says whether to blame the server."""

    def __init__(self, message: str, *, down: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.down = down
        #: The HTTP status of a refused request (None: no response, or a broken stream).
        self.status = status


class TokenSink(Protocol):
    def on_token(self, text: str) -> None:
        """One generated token's chunk arrived; ``text`` is '' when it decoded to no text yet."""


@dataclass(frozen=True, slots=True)
class CompletionEnd:
    """How a streamed completion ended, from its last chunks."""

    #: vLLM's finish reason: "stop", "length", "repetition", or "abort" / "error"
    #: when vLLM gave the request up (see :attr:`given_up`).
    finish_reason: str
    #: The usage chunk's counts; None when the server sent none.
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_prompt_tokens: int
    #: Set when the connection failed after the finish reason had arrived: the
    #: reply stands, but the server is suspect.
    connection_error: str | None = None

    @property
    def given_up(self) -> bool:
        """vLLM ended the request itself (its own abort, or an error inside the engine)."""
        return self.finish_reason in ("abort", "error")


def chat_completion_body(request: EngineRequest, model: str | None) -> dict[str, Any]:
    """The JSON body of a streamed chat completion for ``request``.

    ``model`` is the base model's served name. A request for a LoRA adapter
    names the adapter instead: vLLM's server serves each adapter it was
    started with (``--lora-modules NAME=PATH``) as a model of that name.
    """
    s = request.sampling
    body: dict[str, Any] = {
        "model": request.lora if request.lora is not None else model,
        "messages": openai_messages(request.messages),
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": False},
        "chat_template_kwargs": {"enable_thinking": s.enable_thinking},
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_chat_completion(
    client: httpx.AsyncClient, base_url: str, body: dict[str, Any], sink: TokenSink
) -> CompletionEnd:
    """Stream the completion from the server at ``base_url`` into ``sink``.

    Raises UpstreamFailed. Cancellation closes the response (``async with``).
    """
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    connection_error: str | None = None
    try:
        async with client.stream("POST", base_url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                message = error_message(raw) or resp.reason_phrase
                raise UpstreamFailed(f"HTTP {resp.status_code}: {message}", down=resp.status_code >= 500,
                                     status=resp.status_code)
            complete = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[5:].strip()
                if data == "[DONE]":
                    complete = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise UpstreamFailed(f"bad event {data[:80]!r}", down=True) from exc
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise UpstreamFailed(f"error event: {error_text(chunk['error'])}", down=True)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    # The opening chunk carries the role and no token.
                    if not ("role" in delta and not content):
                        sink.on_token(content or "")
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
            if not complete and finish_reason is None:
                raise UpstreamFailed("the stream ended before the reply finished", down=True)
    except httpx.TimeoutException as exc:
        if finish_reason is None:
            raise UpstreamFailed(f"timed out ({describe_error(exc)})", down=True) from exc
    except httpx.HTTPError as exc:
        # Connection refused / reset, incomplete chunked body: the server is gone.
        if finish_reason is None:
            raise UpstreamFailed(describe_error(exc), down=True) from exc
        connection_error = describe_error(exc)
    if finish_reason is None:
        raise UpstreamFailed("the stream ended without a finish reason", down=True)
    counts = usage or {}
    details = counts.get("prompt_tokens_details") or {}
    prompt_tokens = counts.get("prompt_tokens")
    completion_tokens = counts.get("completion_tokens")
    return CompletionEnd(
        finish_reason=finish_reason,
        prompt_tokens=int(prompt_tokens) if isinstance(prompt_tokens, int) else None,
        completion_tokens=int(completion_tokens) if isinstance(completion_tokens, int) else None,
        cached_prompt_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
        connection_error=connection_error,
    )


def describe_error(exc: BaseException) -> str:
    """``Type: message`` (just the type when the message is empty, as httpx's often are)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_text(error: Any) -> str:
    """The message of an OpenAI-style ``error`` object."""
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def error_message(raw: bytes) -> str:
    """A short message from an error response body (JSON or not)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace")
    if isinstance(body, dict):
        if "error" in body:
            return error_text(body["error"])[:300]
        if "message" in body:
            return str(body["message"])[:300]
    return str(body)[:300]
