"""Placeholder: filled in by its own change."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
