"""History over REST for the Bearer-authenticated user.

    GET    /v1/conversations                                ids and last activity, newest first
    POST   /v1/conversations                                a new conversation with a character (addition 18)
    GET    /v1/conversations/{conversation_id}/messages     one page of history, oldest first
    DELETE /v1/conversations/{conversation_id}              the conversation and its history
    DELETE /v1/users/me                                     everything stored for the user (audited)
    GET    /v1/users/me/memory                              the user's pinned facts (addition 22)
    POST   /v1/users/me/memory                              pin a fact {text}
    DELETE /v1/users/me/memory/{fact_id}                    unpin one fact

Every endpoint needs ``Authorization: Bearer <jwt>`` (also with ``--auth dev``:
the development mode only trusts a WebSocket ``hello.user``). Requests only
ever reach the token's own keys, so another user's conversation is simply not
there: ``404 not_found``, exactly as if it did not exist.

Errors are ``{"error": {"code", "message", ...}}`` with the protocol's codes
(``bad_request`` 400, ``unauthorized`` 401, ``not_found`` 404,
``turn_in_progress`` 409, ``rate_limited``/``busy`` 429, ``unavailable`` 503),
plus ``turn_id`` / ``retry_after_ms`` where they apply.

Paging: ``limit`` (1..100, default 50) messages older than ``before`` (a
message id), oldest first, like ``history.get``. ``next_before`` is the id to
pass as ``before`` for the previous page, or ``null`` when there is none.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import HTTP_STATUS, BadRequest, NotFound, RapportError, Unavailable
from protocol.frames import MAX_FACT_CHARS, MAX_FACT_ID_CHARS, MAX_ID_CHARS
from sessions.characters import greeting_of
from sessions.exchanges import wire_messages
from sessions.store import RETRY_AFTER_MS

from .auth import Identity, bearer_token
from .coordination import wall_ms
from .query_params import int_param
from .request_body import read_json_object
from .turns import DEFAULT_USER_NAME

if TYPE_CHECKING:
    from .audit import Audit
    from .runtime import Runtime

log = logging.getLogger("rapport.rest")

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
#: How long DELETE /v1/users/me waits for the user's running turns to end after cancelling them.
CANCEL_WAIT_S = 10.0



def error_response(exc: RapportError) -> Response:
    # An error may name its own status (a body over its bound is 413, not 400).
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(exc.code, 500)
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    body.update({k: v for k, v in exc.fields.items() if k in ("turn_id", "retry_after_ms")})
    if status == 503:
        # Every 503 says when to try again, in the body as well as Retry-After.
        body.setdefault("retry_after_ms", RETRY_AFTER_MS)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rapport"'
    retry = exc.fields.get("retry_after_ms")
    if status in (429, 503):
        ms = retry if isinstance(retry, (int, float)) else 1000
        headers["Retry-After"] = str(max(1, math.ceil(ms / 1000.0)))
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _identity(request: Request) -> Identity:
    rt: Runtime = request.app.state.runtime
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise rt.auth.missing("missing credentials: send 'Authorization: Bearer <jwt>'")
    return await rt.auth.authenticate(token)


async def _user(request: Request) -> str:
    return (await _identity(request)).user_id


def _conversation_id(request: Request) -> str:
    value = request.path_params["conversation_id"]
    if not value:
        raise BadRequest("the conversation id must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise BadRequest(f"the conversation id is longer than {MAX_ID_CHARS} characters")
    return value


def _handled(endpoint):
    """Turn every RapportError of ``endpoint`` into the JSON error answer."""

    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RapportError as exc:
            return error_response(exc)
        except RedisError as exc:
            log.warning("redis error on %s: %s", request.url.path, exc)
            return error_response(Unavailable("storage unavailable; retry shortly"))

    wrapper.__name__ = endpoint.__name__
    wrapper.__doc__ = endpoint.__doc__
    return wrapper


@_handled
async def list_conversations(request: Request) -> Response:
    user_id = await _user(request)
    rt: Runtime = request.app.state.runtime
    rows = await rt.store.list_conversations(user_id=user_id)
    return JSONResponse({"conversations": [
        {"conversation_id": conv, "last_activity_at": ms} for conv, ms in rows]})


@_handled
async def get_messages(request: Request) -> Response:
    user_id = await _user(request)
    conv = _conversation_id(request)
    limit = int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    before = request.query_params.get("before") or None
    if before is not None and len(before) > 64:
        raise BadRequest("'before' is not a message id")
    rt: Runtime = request.app.state.runtime
    # One extra message tells whether an older page exists.
    page, meta = await rt.store.history_and_meta(user_id=user_id, conversation_id=conv, limit=limit + 1,
                                                 before=before)
    if not page and await rt.redis.zscore(rt.keys.conversations(user_id), conv) is None:
        raise NotFound(f"no conversation '{conv}'")
    more = len(page) > limit
    if more:
        page = page[1:]
    body: dict[str, Any] = {
        "conversation_id": conv,
        "messages": wire_messages(page, meta),
        "next_before": page[0].id if more and page else None,
    }
    if meta.get("character_id"):
        body["character_id"] = meta["character_id"]
    return JSONResponse(body)


#: A conversation-create body holds two ids and a number.
MAX_CREATE_BODY_BYTES = 4096


@_handled
async def create_conversation(request: Request) -> Response:
    """``POST /v1/conversations`` {conversation_id?, character_id, greeting?}: bind a new
    conversation to a character and store its greeting (201); 200 when it already is."""
    identity = await _identity(request)
    body = await read_json_object(request, MAX_CREATE_BODY_BYTES)
    character_id = body.get("character_id")
    if not isinstance(character_id, str) or not character_id:
        raise BadRequest("field 'character_id' must be a non-empty string")
    if len(character_id) > MAX_ID_CHARS:
        raise BadRequest(f"field 'character_id' is longer than {MAX_ID_CHARS} characters")
    conv = body.get("conversation_id")
    if conv is None:
        conv = "c_" + uuid.uuid4().hex[:16]
    if not isinstance(conv, str) or not conv or len(conv) > MAX_ID_CHARS:
        raise BadRequest(f"field 'conversation_id' must be a string of 1 to {MAX_ID_CHARS} characters")
    index = body.get("greeting", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise BadRequest("field 'greeting' must be a non-negative integer (0: first_mes)")
    rt: Runtime = request.app.state.runtime
    character = await rt.manager.character(character_id)
    greeting = greeting_of(character, index, user_name=identity.name or DEFAULT_USER_NAME)
    created = await rt.store.bind_conversation(user_id=identity.user_id, conversation_id=conv,
                                               character_id=character_id, greeting=greeting, now_ms=wall_ms())
    messages, meta = await rt.store.history_and_meta(user_id=identity.user_id, conversation_id=conv, limit=MAX_LIMIT)
    return JSONResponse({"conversation_id": conv, "character_id": character_id,
                         "messages": wire_messages(messages, meta)}, status_code=201 if created else 200)


@_handled
async def delete_conversation(request: Request) -> Response:
    user_id = await _user(request)
    conv = _conversation_id(request)
    rt: Runtime = request.app.state.runtime
    if not await rt.store.delete_conversation(user_id=user_id, conversation_id=conv):
        raise NotFound(f"no conversation '{conv}'")
    return JSONResponse({"conversation_id": conv, "deleted": True})


class _Canceller:
    """Stands in for a connection when the server itself cancels a user's turns."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    def push(self, frame: dict[str, Any], *, live: bool = False) -> None:
        pass

    def adopt(self, turn_id: str, task: asyncio.Task[None]) -> None:
        task.cancel()


@_handled
async def delete_me(request: Request) -> Response:
    """Forget the user: running turns here are cancelled first, then every key under their tag goes."""
    user_id = await _user(request)
    deleted = await erase_user(request, user_id, actor=user_id)
    return JSONResponse({"user_id": user_id, "deleted": True, "deleted_keys": deleted})


async def erase_user(request: Request, user_id: str, *, actor: str) -> int:
    """Erase ``user_id`` (for themselves or an admin, ``actor``) and audit it; how many keys went."""
    rt: Runtime = request.app.state.runtime
    manager = rt.manager
    canceller = _Canceller(user_id)
    waiting: list[asyncio.Event] = []
    for record in await rt.store.active_turns(user_id=user_id):
        live = manager.live.get(record.turn_id)
        try:
            await manager.cancel(canceller, record.turn_id)
        except RapportError:
            # Running on another process (or already gone): its writes find no
            # record once the keys are deleted, so nothing comes back.
            continue
        if live is not None:
            waiting.append(live.done)
    if waiting:
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in waiting)), CANCEL_WAIT_S)
        except TimeoutError:
            log.warning("user deletion: a cancelled turn did not end within %.0fs", CANCEL_WAIT_S)
    deleted = await rt.store.delete_user(user_id=user_id)
    audit: Audit | None = getattr(request.app.state, "audit", None)
    if audit is not None:
        audit.record("user_erased", actor=actor, target=user_id, deleted_keys=deleted)
        await audit.flush()
    return deleted


#: A memory.add body holds one fact of at most MAX_FACT_CHARS characters (4 bytes each at most in UTF-8,
#: 6 when JSON-escaped) and a field name.
MAX_MEMORY_BODY_BYTES = MAX_FACT_CHARS * 6 + 256


async def _facts_body(rt: Runtime, user_id: str) -> dict[str, Any]:
    return {"facts": [fact.wire() for fact in await rt.facts.list(user_id)]}


@_handled
async def list_memory(request: Request) -> Response:
    """``GET /v1/users/me/memory``: {facts: [{id, text, created_at}]}, oldest first."""
    user_id = await _user(request)
    rt: Runtime = request.app.state.runtime
    return JSONResponse(await _facts_body(rt, user_id))


@_handled
async def add_memory(request: Request) -> Response:
    """``POST /v1/users/me/memory`` {text}: {fact, facts}; the same text twice is pinned once."""
    user_id = await _user(request)
    body = await read_json_object(request, MAX_MEMORY_BODY_BYTES)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("field 'text' must be a non-empty string")
    if len(text) > MAX_FACT_CHARS:
        raise BadRequest(f"field 'text' is longer than {MAX_FACT_CHARS} characters")
    rt: Runtime = request.app.state.runtime
    rt.moderation.check_input(text, user_id=user_id)
    fact = await rt.facts.add(user_id, text)
    return JSONResponse({"fact": fact.wire(), **await _facts_body(rt, user_id)})


@_handled
async def delete_memory(request: Request) -> Response:
    """``DELETE /v1/users/me/memory/{fact_id}``: {facts} after the change; 404 for an unknown id."""
    user_id = await _user(request)
    fact_id = request.path_params["fact_id"]
    rt: Runtime = request.app.state.runtime
    if not fact_id or len(fact_id) > MAX_FACT_ID_CHARS or not await rt.facts.delete(user_id, fact_id):
        raise NotFound(f"no pinned fact '{fact_id[:MAX_FACT_ID_CHARS]}'")
    return JSONResponse(await _facts_body(rt, user_id))


routes: list[BaseRoute] = [
    Route("/v1/conversations", list_conversations, methods=["GET"]),
    Route("/v1/conversations", create_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id:path}/messages", get_messages, methods=["GET"]),
    Route("/v1/conversations/{conversation_id:path}", delete_conversation, methods=["DELETE"]),
    Route("/v1/users/me", delete_me, methods=["DELETE"]),
    Route("/v1/users/me/memory", list_memory, methods=["GET"]),
    Route("/v1/users/me/memory", add_memory, methods=["POST"]),
    Route("/v1/users/me/memory/{fact_id}", delete_memory, methods=["DELETE"]),
]
