"""Operator and admin endpoints under ``/v1/admin/``.

    GET    /v1/admin/users/{user_id}/conversations   operator   a user's conversation ids and last activity
    DELETE /v1/admin/users/{user_id}                 admin      erase the user (as DELETE /v1/users/me)
    GET    /v1/admin/audit                           operator   the audit log, newest first

Roles come from the token (:mod:`server.auth`): ``admin`` includes
``operator``. A token without the role gets ``403 forbidden``; no or an invalid
token ``401 unauthorized``. Tokens signed with the public development secret
(a loopback server without ``--jwt-secret``) are accepted here only from a
loopback peer: anyone can mint them. The development mode's ``hello.user``
never carries a role, and these endpoints take only Bearer tokens.

Every request that gets past authentication, allowed or not, is an
``admin_action`` entry in the audit log (actor, role, action, target, status).
Operators see conversation ids and times, never message text.

``GET /v1/admin/audit`` takes ``limit`` (1..500, default 100), ``before`` (an
entry id: older entries only) and ``kind`` (one kind only); it answers
``{"entries": [...], "next_before": id | null}``.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import BadRequest, RapportError, Unauthorized

from .audit import entry_from
from .auth import Identity, bearer_token, check_user_id
from .config import is_loopback
from .query_params import int_param
from .rest import _handled, erase_user

if TYPE_CHECKING:
    from .audit import Audit
    from .runtime import Runtime

log = logging.getLogger("rapport.admin")

DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 500
#: At most this many entries are scanned for one filtered page.
MAX_AUDIT_SCAN = 5000
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_KIND = re.compile(r"^[a-z0-9_.]{1,40}$")


class Forbidden(RapportError):
    """Authenticated, but without the role (or from where) this endpoint needs: HTTP 403."""

    code = "forbidden"


def _forbidden(exc: Forbidden) -> Response:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=403)


def _audit(request: Request) -> Audit:
    audit: Audit = request.app.state.audit
    return audit


async def _caller(request: Request, role: str, action: str, target: str | None) -> Identity:
    """The caller's identity if it holds ``role``; audits the attempt; raises otherwise."""
    rt: Runtime = request.app.state.runtime
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise rt.auth.missing("missing credentials: send 'Authorization: Bearer <jwt>'")
    identity = await rt.auth.authenticate(token)
    audit = _audit(request)
    client = request.client
    if identity.development and not (client is not None and is_loopback(client.host)):
        audit.record("admin_action", actor=identity.user_id, role=identity.role, action=action, target=target,
                     status="forbidden_development_token")
        raise Forbidden("tokens signed with the public development secret reach admin endpoints "
                        "only from loopback")
    if not identity.has(role):
        audit.record("admin_action", actor=identity.user_id, role=identity.role, action=action, target=target,
                     status="forbidden")
        raise Forbidden(f"this endpoint needs the {role} role")
    return identity


def _admin(role: str, action: str):
    """Authorize ``role`` for ``action`` (a 403 is JSON too), then run the endpoint and audit its outcome."""

    def decorate(endpoint):
        @_handled
        async def wrapper(request: Request) -> Response:
            try:
                target = _target(request)
            except BadRequest:
                target = "(invalid)"  # authenticated first; the endpoint answers 400 afterwards
            try:
                identity = await _caller(request, role, action, target)
            except Forbidden as exc:
                await _audit(request).flush()
                return _forbidden(exc)
            audit = _audit(request)
            try:
                response = await endpoint(request, identity)
            except RapportError as exc:
                audit.record("admin_action", actor=identity.user_id, role=identity.role, action=action,
                             target=target, status=exc.code)
                await audit.flush()
                raise
            audit.record("admin_action", actor=identity.user_id, role=identity.role, action=action,
                         target=target, status="ok")
            await audit.flush()
            return response

        wrapper.__name__ = endpoint.__name__
        wrapper.__doc__ = endpoint.__doc__
        return wrapper

    return decorate


def _target(request: Request) -> str | None:
    raw = request.path_params.get("user_id")
    if raw is None:
        return None
    try:
        return check_user_id(raw)
    except Unauthorized as exc:
        raise BadRequest(f"the user id in the path is not valid: {exc.message}") from None


@_admin("operator", "conversations.list")
async def user_conversations(request: Request, identity: Identity) -> Response:
    rt: Runtime = request.app.state.runtime
    user_id = _target(request)
    assert user_id is not None
    rows = await rt.store.list_conversations(user_id=user_id)
    return JSONResponse({"user_id": user_id, "conversations": [
        {"conversation_id": conv, "last_activity_at": ms} for conv, ms in rows]})


@_admin("admin", "user.erase")
async def erase(request: Request, identity: Identity) -> Response:
    user_id = _target(request)
    assert user_id is not None
    deleted = await erase_user(request, user_id, actor=identity.user_id)
    return JSONResponse({"user_id": user_id, "deleted": True, "deleted_keys": deleted})


@_admin("operator", "audit.read")
async def read_audit(request: Request, identity: Identity) -> Response:
    q = request.query_params
    limit = int_param(request, "limit", DEFAULT_AUDIT_LIMIT, 1, MAX_AUDIT_LIMIT)
    before = q.get("before") or None
    if before is not None and not _STREAM_ID.match(before):
        raise BadRequest("'before' must be an audit entry id such as 1700000000000-0")
    kind = q.get("kind") or None
    if kind is not None and not _KIND.match(kind):
        raise BadRequest("'kind' must be an audit entry kind such as auth_failure")
    rt: Runtime = request.app.state.runtime
    key = rt.keys.audit()
    entries: list[dict[str, str]] = []
    scanned = 0
    last: str | None = before
    done = False
    while len(entries) < limit and scanned < MAX_AUDIT_SCAN:
        rows: Any = await rt.redis.xrevrange(key, max=f"({last}" if last else "+", min="-", count=limit)
        for entry_id, fields in rows:
            if len(entries) == limit:
                break
            scanned += 1
            last = entry_id
            if kind is None or fields.get("kind") == kind:
                entries.append(entry_from(entry_id, fields))
        if len(rows) < limit and (not rows or last == rows[-1][0]):
            done = True  # the oldest entry has been scanned
            break
    # Where the next (older) page starts; null once there is none.
    return JSONResponse({"entries": entries, "next_before": None if done else last})


# Not here yet, because the features are not: exporting feedback (there is no
# feedback store) and managing characters (there are no characters).
routes: list[BaseRoute] = [
    Route("/v1/admin/users/{user_id:path}/conversations", user_conversations, methods=["GET"]),
    Route("/v1/admin/users/{user_id:path}", erase, methods=["DELETE"]),
    Route("/v1/admin/audit", read_audit, methods=["GET"]),
]
