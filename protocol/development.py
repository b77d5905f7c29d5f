"""What a loopback development server and its clients agree on without
configuration.

A server started with no JWT secret on a loopback address (``make run``) signs
and verifies tokens with this well-known secret, so that ``rapport chat``,
``rapport bench`` and ``rapport eval`` can mint tokens for it out of the box.
Any other host requires a configured secret (server.config refuses this one).
"""

from __future__ import annotations

DEV_JWT_SECRET = "rapport-development-secret-change-me"
