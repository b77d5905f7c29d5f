"""WebSocket close codes the contract uses (docs/protocol.md).

1000-1011 are RFC 6455 section 7.4.1's registered codes; 4000-4999 are
reserved for applications (section 7.4.2), and Rapport mirrors the HTTP status
each one resembles (401 unauthorized, 408 timeout, 429 too many) so a reader
of a log guesses the meaning.
"""

from __future__ import annotations

NORMAL = 1000
GOING_AWAY = 1001          # server shutdown: reconnect, possibly elsewhere
PROTOCOL_ERROR = 1002      # a client gives up on a server that broke the contract
ABNORMAL = 1006            # never sent: what a peer reports when the TCP connection died
INVALID_PAYLOAD = 1007     # invalid UTF-8 in a text frame (RFC 6455 section 8.1)
POLICY = 1008              # origin refused, or a socket that stopped reading
TOO_BIG = 1009             # a frame over limits.max_frame_bytes
INTERNAL = 1011
TRY_AGAIN_LATER = 1013     # IANA's registry: over the per-process cap of connections not yet authenticated
UNAUTHORIZED = 4401        # no valid credentials in time; retrying without new ones is pointless
HEARTBEAT_TIMEOUT = 4408   # the client was silent longer than heartbeat.timeout_ms
TOO_MANY_CONNECTIONS = 4429  # over the per-user connection cap
