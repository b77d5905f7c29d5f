"""One exception hierarchy for the whole project, rooted at :class:`RapportError`.

Every error that can reach a client carries the protocol's ``error.code`` so the
gateway turns it into an ``error`` frame without guessing (see docs/protocol.md,
"error.code").
"""

from __future__ import annotations


class RapportError(Exception):
    """Root of every error Rapport raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        # Extra fields for the error frame: turn_id, client_turn_id, retry_after_ms.
        self.fields = {k: v for k, v in fields.items() if v is not None}


class BadRequest(RapportError):
    """A frame that is not valid protocol: wrong type, missing or ill-typed field."""

    code = "bad_request"


class Unauthorized(RapportError):
    """Missing, expired or wrongly signed credentials."""

    code = "unauthorized"


class NotFound(RapportError):
    """The thing does not exist, or belongs to another user (indistinguishable)."""

    code = "not_found"


class TurnInProgress(RapportError):
    """The conversation already has a running turn (guarantee 4)."""

    code = "turn_in_progress"


class Conflict(RapportError):
    """The thing already exists (creating a character under an id that is taken)."""

    code = "conflict"


class RateLimited(RapportError):
    code = "rate_limited"


class Busy(RapportError):
    """Admission control: the turn would miss its first-token budget."""

    code = "busy"


class TooLarge(RapportError):
    """Input over a limit (characters, or tokens the model's context cannot hold)."""

    code = "too_large"


class ResumeExpired(RapportError):
    code = "resume_expired"


class Unavailable(RapportError):
    """A dependency (Redis, the engine) cannot be reached right now."""

    code = "unavailable"
    #: When the raiser cannot tell: the contract promises every `unavailable`
    #: says when to try again, so a client never has to guess (docs/protocol.md).
    DEFAULT_RETRY_AFTER_MS = 1000

    def __init__(self, message: str, **fields: object) -> None:
        fields.setdefault("retry_after_ms", self.DEFAULT_RETRY_AFTER_MS)
        super().__init__(message, **fields)


class ContentFiltered(RapportError):
    """A user's message the moderation policy refuses; nothing of it is stored."""

    code = "content_filter"


class EngineError(RapportError):
    """The engine failed while generating; the turn ends ``interrupted``."""

    code = "unavailable"


class IllegalTransition(RapportError):
    """A turn state machine was asked for a transition its table does not allow.

    This is a programming error in an adapter, never a client's fault.
    """

    code = "internal"


#: The HTTP status each error code answers with on the HTTP endpoints
#: (REST history and the OpenAI-compatible API); unknown codes are 500.
HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "too_large": 400,
    "content_filter": 400,
    "context_length_exceeded": 400,
    "unauthorized": 401,
    "not_found": 404,
    "turn_in_progress": 409,
    "conflict": 409,
    "rate_limited": 429,
    "busy": 429,
    "unavailable": 503,
    "budget_exceeded": 503,
    "internal": 500,
}
