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
from dataclasses import dataclass, field

from protocol.errors import TooLarge
from sessions.messages import ChatMessage


@dataclass(frozen=True, slots=True)
class PastTurn:
    """One completed exchange from history: the user's text and the reply kept.

    A character's greeting is a turn with no user text (it opens the conversation).
    """

    user: str
    assistant: str
    #: The exchange (the user message's turn id) it came from; "" for a greeting
    #: or a turn made up by a caller. Not part of the prompt.
    exchange_id: str = field(default="", compare=False)


#: How many turns the turn cap drops at once (see the module docstring).
TRIM_BLOCK = 4


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


@dataclass(frozen=True, slots=True)
class Context:
    """What the model sees besides the conversation's turns, all kept whatever is trimmed.

    Placed by how often each part changes, so vLLM's prefix cache keeps as
    much as it can: ``system`` (the server's prompt or a character's persona,
    the same for every user of it) first; ``memory`` (the user's pinned facts
    and the conversation's summary, which change rarely) appended to the same
    system message; ``lore`` (lorebook entries matched by the recent turns,
    which may change on any turn) as a system message right before the new
    user message, so a change costs only the tail; ``post_history`` (a
    card's ``post_history_instructions``) last, as the cards' convention has it.
    """

    system: str = ""
    memory: str = ""
    lore: str = ""
    post_history: str = ""


def render(system_prompt: str | Context, turns: Sequence[PastTurn], new_text: str,
           post_history: str = "") -> list[ChatMessage]:
    """The chat: system prompt (and memory), past turns, lore, the new message, post-history."""
    context = system_prompt if isinstance(system_prompt, Context) else Context(system_prompt,
                                                                                post_history=post_history)
    messages: list[ChatMessage] = []
    system = "\n\n".join(part for part in (context.system, context.memory) if part)
    if system:
        messages.append(ChatMessage("system", system))
    for turn in turns:
        if turn.user:
            messages.append(ChatMessage("user", turn.user))
        # A cancelled or interrupted reply may be empty; an empty assistant
        # message teaches the model nothing, so the user turn stands alone.
        if turn.assistant:
            messages.append(ChatMessage("assistant", turn.assistant))
    if context.lore:
        messages.append(ChatMessage("system", context.lore))
    messages.append(ChatMessage("user", new_text))
    if context.post_history:
        messages.append(ChatMessage("system", context.post_history))
    return messages


@dataclass(frozen=True, slots=True)
class Window:
    """The prompt, and which past turns it keeps: ``history[first_kept:]``."""

    messages: list[ChatMessage]
    first_kept: int


def build_window(
    *,
    system_prompt: str | Context,
    history: Sequence[PastTurn],
    new_text: str,
    max_history_turns: int,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[Sequence[ChatMessage]], int] | None = None,
    trim_block: int = TRIM_BLOCK,
    trim_quantum: float = 0.5,
    post_history: str = "",
) -> list[ChatMessage]:
    """The messages of :func:`plan_window`."""
    return plan_window(system_prompt=system_prompt, history=history, new_text=new_text,
                       max_history_turns=max_history_turns, max_prompt_tokens=max_prompt_tokens,
                       count_tokens=count_tokens, trim_block=trim_block, trim_quantum=trim_quantum,
                       post_history=post_history).messages


def plan_window(
    *,
    system_prompt: str | Context,
    history: Sequence[PastTurn],
    new_text: str,
    max_history_turns: int,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[Sequence[ChatMessage]], int] | None = None,
    trim_block: int = TRIM_BLOCK,
    trim_quantum: float = 0.5,
    post_history: str = "",
    history_offset: int = 0,
) -> Window:
    """The messages to send and the first past turn kept. Raises TooLarge when
    even no history would not fit.

    Over the token budget, the turns dropped from the front are chosen so that
    the number of tokens dropped is the overflow rounded up to a multiple of
    ``trim_quantum * max_prompt_tokens``. That amount only changes when the
    conversation has grown by a whole quantum, so after a trim the next turns
    extend the same prefix (and hit vLLM's cache) until another quantum of
    tokens has accumulated, instead of the start moving every few turns. The
    choice depends only on the conversation, never on state kept between turns,
    so every gateway process makes the same one.

    ``system_prompt`` is the static prefix (a character's persona), or a whole
    :class:`Context`; ``post_history`` the instructions after the new message
    (when ``system_prompt`` is a plain string). Everything but the turns is
    kept whatever is trimmed. ``history_offset`` is how many turns of the
    conversation came before ``history[0]`` (they were not read).
    """
    context = system_prompt if isinstance(system_prompt, Context) else Context(system_prompt,
                                                                                post_history=post_history)
    # ``history`` may be only the newest part of a longer conversation (what
    # was read): the turn cap is applied to the turns' positions in the whole
    # conversation, so the first kept turn moves in blocks however much was read.
    offset = max(0, history_offset)
    start = min(len(history), max(0, first_kept_turn(len(history) + offset, max_history_turns, trim_block) - offset))
    if max_prompt_tokens is None or count_tokens is None:
        return Window(render(context, history[start:], new_text), start)
    bare = render(context, [], new_text)
    if count_tokens(bare) > max_prompt_tokens:
        raise TooLarge(
            f"the message needs more than the {max_prompt_tokens} prompt tokens the model's context allows"
        )
    window = render(context, history[start:], new_text)
    overflow = count_tokens(window) - max_prompt_tokens
    if overflow <= 0:
        return Window(window, start)
    quantum = max(1, int(max_prompt_tokens * trim_quantum))
    need = -(-overflow // quantum) * quantum
    empty = count_tokens(render("", [], ""))
    dropped = 0
    while start < len(history) and dropped < need:
        dropped += count_tokens(render("", [history[start]], "")) - empty
        start += 1
    # Token counts of a chat template are nearly, not exactly, additive: check.
    while start < len(history):
        window = render(context, history[start:], new_text)
        if count_tokens(window) <= max_prompt_tokens:
            return Window(window, start)
        start += 1
    return Window(bare, len(history))


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
                turns.append(PastTurn(pending[1], "", pending[0]))
                pending = None
            turns.append(PastTurn("", text))
        elif role == "user":
            if pending is not None:
                turns.append(PastTurn(pending[1], "", pending[0]))
            pending = (turn_id, text)
        elif role == "assistant":
            if pending is not None and pending[0] == turn_id:
                turns.append(PastTurn(pending[1], text, pending[0]))
            pending = None if pending is not None and pending[0] == turn_id else pending
    if pending is not None:
        turns.append(PastTurn(pending[1], "", pending[0]))
    return turns
