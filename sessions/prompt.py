"""The prompt window: which part of a conversation the model sees.

Pure functions, no I/O. The model sees the system prompt, then the newest
complete turns of history, then the new user message (guarantee 5). Two limits
apply: at most ``max_history_turns`` past turns, and the whole prompt must fit
``max_prompt_tokens`` (the context window minus the reply's ``max_tokens``).

Why trim in jumps: vLLM's automatic prefix caching reuses the KV cache of the
longest prompt prefix it has seen, in blocks of tokens. Dropping the oldest
turn one at a time would shift the start of the prompt on every turn and throw
the whole conversation's cache away each time. Instead the first kept turn
moves forward in jumps -- ``trim_block`` turns at once under the turn cap, and
a whole quantum of tokens (half the budget by default) under the token
budget -- so between two jumps consecutive prompts extend one another and the
cache serves everything but the new turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.errors import TooLarge
from sessions.messages import ChatMessage


@dataclass(frozen=True, slots=True)
class PastTurn:
    """One completed exchange from history: the user's text and the reply kept.

    A character's greeting is a turn with no user text (it opens the conversation).
    """

    user: str
    assistant: str


def first_kept_turn(total_turns: int, max_turns: int, trim_block: int) -> int:
    """Index of the oldest turn to keep under the turn cap, moving in whole blocks.

    Keeps between ``max_turns - trim_block + 1`` and ``max_turns`` turns once
    the conversation is longer than the cap.
    """
    if max_turns <= 0:
        return total_turns
    overflow = total_turns - max_turns
    if overflow <= 0:
        return 0
    block = max(1, min(trim_block, max_turns))
    return -(-overflow // block) * block  # ceil to a multiple of the block


def render(system_prompt: str, turns: Sequence[PastTurn], new_text: str,
           post_history: str = "") -> list[ChatMessage]:
    """The chat: system prompt, past turns, the new message, then the post-history instructions.

    ``post_history`` (a character card's ``post_history_instructions``) comes
    last, as the cards' convention has it, so it stays close to the reply.
    """
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append(ChatMessage("system", system_prompt))
    for turn in turns:
        if turn.user:
            messages.append(ChatMessage("user", turn.user))
        # A cancelled or interrupted reply may be empty; an empty assistant
        # message teaches the model nothing, so the user turn stands alone.
        if turn.assistant:
            messages.append(ChatMessage("assistant", turn.assistant))
    messages.append(ChatMessage("user", new_text))
    if post_history:
        messages.append(ChatMessage("system", post_history))
    return messages


def build_window(
    *,
    system_prompt: str,
    history: Sequence[PastTurn],
    new_text: str,
    max_history_turns: int,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[Sequence[ChatMessage]], int] | None = None,
    trim_block: int = 4,
    trim_quantum: float = 0.5,
    post_history: str = "",
) -> list[ChatMessage]:
    """The messages to send. Raises TooLarge when even no history would not fit.

    Over the token budget, the turns dropped from the front are chosen so that
    the number of tokens dropped is the overflow rounded up to a multiple of
    ``trim_quantum * max_prompt_tokens``. That amount only changes when the
    conversation has grown by a whole quantum, so after a trim the next turns
    extend the same prefix (and hit vLLM's cache) until another quantum of
    tokens has accumulated, instead of the start moving every few turns. The
    choice depends only on the conversation, never on state kept between turns,
    so every gateway process makes the same one.

    ``system_prompt`` is the static prefix (a character's persona) and
    ``post_history`` the instructions after the new message; both are kept
    whatever is trimmed.
    """
    start = first_kept_turn(len(history), max_history_turns, trim_block)
    if max_prompt_tokens is None or count_tokens is None:
        return render(system_prompt, history[start:], new_text, post_history)
    bare = render(system_prompt, [], new_text, post_history)
    if count_tokens(bare) > max_prompt_tokens:
        raise TooLarge(
            f"the message needs more than the {max_prompt_tokens} prompt tokens the model's context allows"
        )
    window = render(system_prompt, history[start:], new_text, post_history)
    overflow = count_tokens(window) - max_prompt_tokens
    if overflow <= 0:
        return window
    quantum = max(1, int(max_prompt_tokens * trim_quantum))
    need = -(-overflow // quantum) * quantum
    empty = count_tokens(render("", [], ""))
    dropped = 0
    while start < len(history) and dropped < need:
        dropped += count_tokens(render("", [history[start]], "")) - empty
        start += 1
    # Token counts of a chat template are nearly, not exactly, additive: check.
    while start < len(history):
        window = render(system_prompt, history[start:], new_text, post_history)
        if count_tokens(window) <= max_prompt_tokens:
            return window
        start += 1
    return bare


def pair_history(messages: Sequence[tuple[str, str, str]]) -> list[PastTurn]:
    """Group (role, text, turn_id) history entries, oldest first, into turns.

    A user message without a reply (the turn still running, or history cut
    mid-turn) pairs with an empty reply; an assistant message whose user
    message was trimmed away by the history cap is skipped. Role
    ``greeting`` (see :func:`sessions.exchanges.model_view`) is a reply with
    no user message. For replies, ``turn_id`` is the exchange they answer.
    """
    turns: list[PastTurn] = []
    pending: tuple[str, str] | None = None  # (turn_id, user text)
    for role, text, turn_id in messages:
        if role == "greeting":
            if pending is not None:
                turns.append(PastTurn(pending[1], ""))
                pending = None
            turns.append(PastTurn("", text))
        elif role == "user":
            if pending is not None:
                turns.append(PastTurn(pending[1], ""))
            pending = (turn_id, text)
        elif role == "assistant":
            if pending is not None and pending[0] == turn_id:
                turns.append(PastTurn(pending[1], text))
            pending = None if pending is not None and pending[0] == turn_id else pending
    if pending is not None:
        turns.append(PastTurn(pending[1], ""))
    return turns
