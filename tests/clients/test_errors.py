"""clients/errors.py: the client's error tree and which failures are worth a retry."""

from __future__ import annotations

from clients.errors import (
    AuthenticationError,
    ClientError,
    ConnectionLost,
    ProtocolViolation,
    ServerError,
    credentials_refused,
)
from protocol import close_codes
from protocol.errors import RapportError


def test_the_tree_is_rooted_in_the_protocols_error():
    for cls in (ClientError, ProtocolViolation, ServerError, ConnectionLost, AuthenticationError):
        assert issubclass(cls, RapportError)
    assert issubclass(AuthenticationError, ConnectionLost)


def test_a_close_code_becomes_the_matching_error():
    lost = ConnectionLost.from_close(close_codes.GOING_AWAY, "restart")
    assert type(lost) is ConnectionLost and lost.close_code == 1001 and lost.reason == "restart"
    assert "1001 restart" in str(lost)
    refused = ConnectionLost.from_close(close_codes.UNAUTHORIZED)
    assert isinstance(refused, AuthenticationError) and refused.code == "unauthorized"


def test_server_error_keeps_the_frame_and_its_fields():
    exc = ServerError({"type": "error", "code": "busy", "message": "full", "retry_after_ms": 250,
                       "client_turn_id": "c1"})
    assert exc.code == "busy" and exc.retry_after_ms == 250 and exc.client_turn_id == "c1" and exc.turn_id is None
    assert str(exc) == "busy: full" and exc.frame["message"] == "full"
    odd = ServerError({"type": "error", "code": 7})
    assert odd.code == "internal" and odd.message == "internal"


def test_only_refused_credentials_are_final():
    assert credentials_refused(ConnectionLost.from_close(close_codes.UNAUTHORIZED))
    assert credentials_refused(AuthenticationError("handshake refused with HTTP 401"))
    assert credentials_refused(ServerError({"type": "error", "code": "unauthorized", "message": "bad token"}))
    assert not credentials_refused(ConnectionLost.from_close(close_codes.TOO_MANY_CONNECTIONS))
    assert not credentials_refused(ServerError({"type": "error", "code": "busy", "message": "full"}))
    assert not credentials_refused(OSError("refused"))
