"""Characters over REST, and the per-process catalog turns read them through.

    POST   /v1/characters                  operator  create from a card: JSON, a PNG, or a multipart upload
    PUT    /v1/characters/{id}             operator  replace (or create) the character ``id``
    DELETE /v1/characters/{id}             operator  delete it
    GET    /v1/characters                  any user  summaries, most recently updated first
    GET    /v1/characters/{id}             any user  the whole character
    GET    /v1/characters/{id}/card        any user  ``?spec=v2|v3&format=json|png``: the card to download

(docs/protocol.md, addition 18). Every request needs ``Authorization: Bearer
<jwt>`` (401 ``unauthorized`` otherwise). Writes need the ``operator`` role
(``admin`` includes it): without it ``403 forbidden``, exactly as the admin
endpoints answer, and like them every write that gets past authentication is
an ``admin_action`` entry in the audit log (actions ``character.create``,
``character.update``, ``character.delete``; the target is the character id).

Uploads: ``Content-Type: application/json`` (a V1/V2/V3 card), ``image/png``
(the card in a ``chara``/``ccv3`` text chunk), or ``multipart/form-data`` with
the card in a ``file`` field (when python-multipart is installed). The body is
bounded while it is read: 1 MiB for JSON, 8 MiB for a PNG; over it the answer
is ``413 too_large`` and nothing is read further. A bad card is ``400
bad_request`` naming the problem, and nothing is stored. The PNG an operator
uploaded is kept as the character's picture, so a PNG export gives the same
image back with a fresh card inside; characters created from JSON export on a
small grey image. A JSON ``PUT`` keeps the picture uploaded before.

Responses: ``POST`` answers 201 and ``PUT`` 200 (201 when it created) with the
character as ``GET /v1/characters/{id}`` shows it: the stored fields
(:meth:`sessions.characters.Character.to_json`), ``greetings`` (how many
greetings the card offers, as in the listing), ``has_avatar`` and
``updated_at`` (ms since the epoch). Creating an id that exists is ``409
conflict``; a deployment holding its maximum of characters answers
``too_large`` to a new one.

Reads of one character go through the process's
:class:`server.character_catalog.CharacterCatalog` (``runtime.characters``),
so a write made on another process shows within its TTL (2 s); on the process
that made it, at once.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from protocol.errors import BadRequest, NotFound
from sessions.card_png import MAX_CARD_JSON_BYTES, MAX_PNG_BYTES, PNG_SIGNATURE, write_card_png
from sessions.character_store import KEEP_AVATAR, KeepAvatar, PutOutcome
from sessions.characters import CHARACTER_ID_PATTERN, Character, card_v2, card_v3, parse_card_bytes, summary

from .admin import Forbidden, _caller, _forbidden
from .auth import bearer_token
from .character_catalog import CharacterCatalog
from .query_params import int_param
from .request_body import BodyTooLarge, read_bounded
from .rest import _handled

if TYPE_CHECKING:
    from .audit import Audit
    from .runtime import Runtime

log = logging.getLogger("rapport.characters")

__all__ = ["CharacterCatalog", "character_routes"]

DEFAULT_PAGE = 50
MAX_PAGE = 100
#: A multipart upload carries a PNG plus its part headers and boundaries.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Starlette's form parsing needs python-multipart, which is optional here.
MULTIPART_AVAILABLE = importlib.util.find_spec("python_multipart") is not None


# ---------------------------------------------------------------- helpers


def _too_large(exc: BodyTooLarge) -> Response:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=413)


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def _reader(request: Request) -> None:
    """Any signed-in user may read characters."""
    rt = _runtime(request)
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise rt.auth.missing("missing credentials: send 'Authorization: Bearer <jwt>'")
    await rt.auth.authenticate(token)


def _path_id(request: Request) -> str:
    value = request.path_params["character_id"]
    if not CHARACTER_ID_PATTERN.fullmatch(value):
        raise BadRequest("a character id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
    return str(value)


def _choice(request: Request, name: str, choices: tuple[str, ...]) -> str:
    value = request.query_params.get(name) or choices[0]
    if value not in choices:
        raise BadRequest(f"'{name}' must be one of {', '.join(choices)}")
    return value


def _view(character: Character, *, updated_at: int | None, has_avatar: bool) -> dict[str, Any]:
    return {**character.to_json(), "greetings": summary(character)["greetings"],
            "has_avatar": has_avatar, "updated_at": updated_at}


def _media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


@dataclass(frozen=True, slots=True)
class _Upload:
    raw: bytes
    content_type: str | None

    @property
    def is_png(self) -> bool:
        return self.raw.startswith(PNG_SIGNATURE)


async def _upload(request: Request) -> _Upload:
    """The uploaded card's bytes, bounded by its kind's limit while the body is read."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        return await _multipart(request)
    if media_type == "application/json" or media_type.endswith("+json") or media_type.startswith("text/"):
        raw = await read_bounded(request, MAX_CARD_JSON_BYTES, "the card JSON")
    else:
        # image/png, or a loosely labelled upload: the bytes decide what it is.
        raw = await read_bounded(request, MAX_PNG_BYTES, "the upload")
        if not raw.startswith(PNG_SIGNATURE) and len(raw) > MAX_CARD_JSON_BYTES:
            raise BodyTooLarge(f"the card JSON is larger than {MAX_CARD_JSON_BYTES} bytes")
    if not raw.strip():
        raise BadRequest("the request body is empty: send a character card as JSON or PNG")
    return _Upload(raw, request.headers.get("content-type"))


async def _multipart(request: Request) -> _Upload:
    if not MULTIPART_AVAILABLE:
        raise BadRequest("this server cannot read multipart uploads; send the card as the request body "
                         "with Content-Type: image/png or application/json")
    from starlette.formparsers import MultiPartException, MultiPartParser

    raw = await read_bounded(request, MAX_PNG_BYTES + MULTIPART_OVERHEAD_BYTES, "the upload")
    parser = MultiPartParser(request.headers, _once(raw), max_files=1, max_fields=4, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"the multipart upload cannot be read: {exc.message}") from None
    try:
        field = form.get("file")
        if not isinstance(field, UploadFile):
            raise BadRequest("the multipart upload has no 'file' field holding the card")
        data = await field.read()
        content_type = field.content_type
    finally:
        await form.close()
    if not data.startswith(PNG_SIGNATURE) and len(data) > MAX_CARD_JSON_BYTES:
        raise BodyTooLarge(f"the card JSON is larger than {MAX_CARD_JSON_BYTES} bytes")
    if not data.strip():
        raise BadRequest("the uploaded file is empty")
    return _Upload(data, content_type)


Endpoint = Callable[[Request], Awaitable[Response]]


def _writer(action: str) -> Callable[[Endpoint], Endpoint]:
    """Authorize an operator for ``action``, run the endpoint, audit the outcome (as admin.py does)."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        @_handled
        async def wrapper(request: Request) -> Response:
            target = request.path_params.get("character_id") or request.query_params.get("id")
            target = target[:128] if isinstance(target, str) else None
            audit: Audit = request.app.state.audit
            try:
                identity = await _caller(request, "operator", action, target)
            except Forbidden as exc:
                await audit.flush()
                return _forbidden(exc)
            status = "ok"
            try:
                response = await endpoint(request)
            except BodyTooLarge as exc:
                status = exc.code
                response = _too_large(exc)
            except Exception as exc:
                status = getattr(exc, "code", "internal")
                raise
            finally:
                # The id a create settled on (made from the card's name) is known only now.
                final = getattr(request.state, "character_id", target)
                audit.record("admin_action", actor=identity.user_id, role=identity.role, action=action,
                             target=final, status=status)
                await audit.flush()
            return response

        wrapper.__name__ = endpoint.__name__
        wrapper.__doc__ = endpoint.__doc__
        return wrapper

    return decorate


async def _save(request: Request, *, character_id: str | None, create: bool) -> PutOutcome:
    upload = await _upload(request)
    character = parse_card_bytes(upload.raw, upload.content_type, character_id=character_id)
    request.state.character_id = character.id
    # A PNG's picture is kept for export; a JSON card keeps the picture stored before.
    avatar: bytes | None | KeepAvatar = upload.raw if upload.is_png else KEEP_AVATAR
    if create and not upload.is_png:
        avatar = None
    return await _runtime(request).characters.put(character, create=create, avatar=avatar)


async def _answer(request: Request, outcome: PutOutcome) -> Response:
    c = outcome.character
    body = _view(c, updated_at=outcome.updated_at,
                 has_avatar=await _runtime(request).character_store.has_avatar(c.id))
    return JSONResponse(body, status_code=201 if outcome.created else 200,
                        headers={"Location": f"/v1/characters/{c.id}"})


# ---------------------------------------------------------------- endpoints


@_writer("character.create")
async def create_character(request: Request) -> Response:
    requested = request.query_params.get("id") or None
    outcome = await _save(request, character_id=requested, create=True)
    return await _answer(request, outcome)


@_writer("character.update")
async def replace_character(request: Request) -> Response:
    outcome = await _save(request, character_id=_path_id(request), create=False)
    return await _answer(request, outcome)


@_writer("character.delete")
async def delete_character(request: Request) -> Response:
    character_id = _path_id(request)
    if not await _runtime(request).characters.delete(character_id):
        raise NotFound(f"no character '{character_id}'")
    return JSONResponse({"id": character_id, "deleted": True})


@_handled
async def list_characters(request: Request) -> Response:
    await _reader(request)
    offset = int_param(request, "offset", 0, 0, 10**9)
    limit = int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    store = _runtime(request).character_store
    # One extra row tells whether another page follows.
    rows = await store.entries(offset=offset, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return JSONResponse({
        "characters": [{**summary(row.character), "updated_at": row.updated_at} for row in rows],
        "total": await store.count(),
        "next_offset": offset + limit if more else None,
    })


async def _known(request: Request) -> Character:
    character_id = _path_id(request)
    character = await _runtime(request).characters.get(character_id)
    if character is None:
        raise NotFound(f"no character '{character_id}'")
    return character


@_handled
async def get_character(request: Request) -> Response:
    await _reader(request)
    character = await _known(request)
    rt = _runtime(request)
    score = await rt.redis.zscore(rt.keys.character_index(), character.id)
    return JSONResponse(_view(character, updated_at=int(score) if score is not None else None,
                              has_avatar=await rt.character_store.has_avatar(character.id)))


@_handled
async def export_card(request: Request) -> Response:
    await _reader(request)
    spec = _choice(request, "spec", ("v3", "v2"))
    fmt = _choice(request, "format", ("json", "png"))
    character = await _known(request)
    card = card_v3(character) if spec == "v3" else card_v2(character)
    if fmt == "json":
        return JSONResponse(card)
    image = await _runtime(request).character_store.get_avatar(character.id)
    # A V3 PNG carries a V2 copy too, so apps that only read V2 still load it (V3 spec).
    png = write_card_png(v2=card_v2(character), v3=card if spec == "v3" else None, image=image)
    return Response(png, media_type="image/png", headers={"Content-Disposition": _attachment(character.id)})


def _attachment(character_id: str) -> str:
    # Ids are [A-Za-z0-9._-] (checked on write), so the plain form is safe; the
    # RFC 6266 extended form is there for readers that prefer it.
    return f"attachment; filename=\"{character_id}.png\"; filename*=UTF-8''{quote(character_id)}.png"


def character_routes() -> list[BaseRoute]:
    """The routes :mod:`server.app` mounts."""
    return [
        Route("/v1/characters", create_character, methods=["POST"]),
        Route("/v1/characters", list_characters, methods=["GET"]),
        Route("/v1/characters/{character_id}/card", export_card, methods=["GET"]),
        Route("/v1/characters/{character_id}", get_character, methods=["GET"]),
        Route("/v1/characters/{character_id}", replace_character, methods=["PUT"]),
        Route("/v1/characters/{character_id}", delete_character, methods=["DELETE"]),
    ]
