"""The reference async client for the Rapport wire protocol v1.

Mobile and desktop apps should copy the *behaviour* of this client; it is kept
small and explicit on purpose, one concept per module, and imports nothing of
the server (only :mod:`protocol`):

``clients.connection.RapportConnection``
    One WebSocket, no reconnection: ``hello``/``ready``, one reader task that
    routes every server frame to its :class:`TurnStream` or request, ``pong``
    for every server ``ping``.

``clients.resilient.ResilientClient``
    Hides a flaky network from the application (protocol guarantees 1-3, 7):
    reconnects with exponential backoff and full jitter, heartbeats, resumes
    every followed turn with the last seq it holds, re-sends an unacknowledged
    ``turn.start`` with the same ``client_turn_id`` and drops the replayed
    duplicates by seq. The app sees one uninterrupted stream per turn::

        async with ResilientClient(url, token=jwt) as client:
            async for delta in client.send("hi", conversation_id="default"):
                print(delta["text"], end="", flush=True)

Underneath: :mod:`clients.driver` (the socket and the handshake),
:mod:`clients.turn_stream` (ordered delivery of one turn), :mod:`clients.retry`
(backoff) and :mod:`clients.errors`. This module gathers the public names so
``from clients.client import ...`` keeps working.
"""

from __future__ import annotations

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

from .connection import RapportConnection, TurnStream
from .driver import Driver
from .errors import AuthenticationError, ClientError, ConnectionLost, ProtocolViolation, ServerError
from .resilient import ResilientClient, ResilientTurn
from .retry import backoff_delay

__all__ = [
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "AuthenticationError",
    "ClientError",
    "ConnectionLost",
    "Driver",
    "ProtocolViolation",
    "RapportConnection",
    "ResilientClient",
    "ResilientTurn",
    "ServerError",
    "TurnStream",
    "backoff_delay",
]
