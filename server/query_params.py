"""Query-string parameters read within bounds, for every REST endpoint.

A missing or empty parameter takes its default; anything else must be an
integer in range, or the request is refused with ``bad_request`` naming the
parameter (never a 500 from a ``ValueError``).
"""

from __future__ import annotations

from starlette.requests import Request

from protocol.errors import BadRequest

__all__ = ["int_param"]


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The integer query parameter ``name``, ``default`` when absent; BadRequest outside ``low..high``."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}")
    return value
