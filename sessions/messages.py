"""The conversation's unit: one message with its role, as history stores it
and as a prompt window hands it to an engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str
