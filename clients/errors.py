"""The errors of the client side, rooted in :class:`protocol.errors.RapportError`.

Each carries a ``code`` in the protocol's style, so an app can switch on
``exc.code`` whether the error came from the server (``ServerError`` keeps the
server's ``error.code``) or from the client's own checks.
"""

from __future__ import annotations

from typing import Any

from protocol import close_codes
from protocol.errors import RapportError

__all__ = ["AuthenticationError", "ClientError", "ConnectionLost", "ProtocolViolation", "ServerError",
           "credentials_refused"]


class ClientError(RapportError):
    """Root of every error raised by the client side."""

    code = "client_error"


class ProtocolViolation(ClientError):
    """The server broke the contract: a seq gap or duplicate, an undecodable frame..."""

    code = "protocol_violation"


class ServerError(ClientError):
    """The server answered with an ``error`` frame; ``code`` is the protocol's error code."""

    def __init__(self, frame: dict[str, Any]) -> None:
        code = frame.get("code")
        code = code if isinstance(code, str) else "internal"
        message = frame.get("message")
        super().__init__(
            message if isinstance(message, str) else code,
            turn_id=frame.get("turn_id"),
            client_turn_id=frame.get("client_turn_id"),
            retry_after_ms=frame.get("retry_after_ms"),
        )
        self.code = code
        self.frame = dict(frame)

    @property
    def retry_after_ms(self) -> int | None:
        return self.fields.get("retry_after_ms")  # type: ignore[return-value]

    @property
    def turn_id(self) -> str | None:
        return self.fields.get("turn_id")  # type: ignore[return-value]

    @property
    def client_turn_id(self) -> str | None:
        return self.fields.get("client_turn_id")  # type: ignore[return-value]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionLost(ClientError):
    """The socket closed (or could not be opened); ``close_code`` when the server sent one."""

    code = "connection_lost"

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason

    @staticmethod
    def from_close(close_code: int | None, reason: str = "") -> ConnectionLost:
        detail = f"{close_code}" + (f" {reason}" if reason else "")
        if close_code == close_codes.UNAUTHORIZED:
            return AuthenticationError(f"server refused the credentials (close {detail}); a new token is needed",
                                       close_code=close_code, reason=reason)
        return ConnectionLost(f"connection closed ({detail})", close_code=close_code, reason=reason)


class AuthenticationError(ConnectionLost):
    """Close 4401 or an HTTP 401/403 handshake: retrying without new credentials is pointless."""

    code = "unauthorized"


def credentials_refused(exc: BaseException) -> bool:
    """Close 4401, an HTTP 401/403 handshake, or an ``unauthorized`` answer to hello.

    Retrying with the same credentials cannot help: callers stop, or ask for a new token.
    """
    return isinstance(exc, ClientError) and exc.code == "unauthorized"
