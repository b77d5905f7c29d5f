"""History over REST for the Bearer-authenticated user.

    GET    /v1/conversations                                ids and last activity, newest first
    GET    /v1/conversations/{conversation_id}/messages     one page of history, oldest first
    DELETE /v1/conversations/{conversation_id}              the conversation and its history
    DELETE /v1/users/me                                     everything stored for the user (audited)

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
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import HTTP_STATUS, BadRequest, NotFound, RapportError, Unavailable
from protocol.frames import MAX_ID_CHARS
from sessions.store import RETRY_AFTER_MS

from .auth import bearer_token

if TYPE_CHECKING:
    from .audit import Audit
    from .runtime import Runtime

log = logging.getLogger("rapport.rest")

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
#: How long DELETE /v1/users/me waits for the user's running turns to end after cancelling them.
CANCEL_WAIT_S = 10.0



def error_response(exc: RapportError) -> Response:
    status = HTTP_STATUS.get(exc.code, 500)
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


async def _user(request: Request) -> str:
    rt: Runtime = request.app.state.runtime
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise rt.auth.missing("missing credentials: send 'Authorization: Bearer <jwt>'")
    return (await rt.auth.authenticate(token)).user_id


def _conversation_id(request: Request) -> str:
    value = request.path_params["conversation_id"]
    if not value:
        raise BadRequest("the conversation id must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise BadRequest(f"the conversation id is longer than {MAX_ID_CHARS} characters")
    return value


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("'limit' must be an integer") from None
    if not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be between 1 and {MAX_LIMIT}")
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
    limit = _limit(request)
    before = request.query_params.get("before") or None
    if before is not None and len(before) > 64:
        raise BadRequest("'before' is not a message id")
    rt: Runtime = request.app.state.runtime
    # One extra message tells whether an older page exists.
    page = await rt.store.history(user_id=user_id, conversation_id=conv, limit=limit + 1, before=before)
    if not page and await rt.redis.zscore(rt.keys.conversations(user_id), conv) is None:
        raise NotFound(f"no conversation '{conv}'")
    more = len(page) > limit
    if more:
        page = page[1:]
    return JSONResponse({
        "conversation_id": conv,
        "messages": [{"id": m.id, "role": m.role, "text": m.text, "turn_id": m.turn_id,
                      "status": m.status, "created_at": m.created_at} for m in page],
        "next_before": page[0].id if more and page else None,
    })


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


routes: list[BaseRoute] = [
    Route("/v1/conversations", list_conversations, methods=["GET"]),
    Route("/v1/conversations/{conversation_id:path}/messages", get_messages, methods=["GET"]),
    Route("/v1/conversations/{conversation_id:path}", delete_conversation, methods=["DELETE"]),
    Route("/v1/users/me", delete_me, methods=["DELETE"]),
]
