"""Conversation memory beyond the prompt window: the running summary.

Pure functions, no I/O. When the prompt window (:mod:`sessions.prompt`) trims
turns from the front, the turns it dropped are folded into a running summary
by a background generation (``server.summaries``). The summary lives in the
conversation's meta hash (``summary``, and ``summary_upto``: the mark of the
newest turn it covers) and is shown to the model right after the system or
character prompt (``Context.memory``).

Why it only changes at a trim: the summary sits near the start of the prompt,
so every change to it invalidates vLLM's prefix cache for the whole
conversation after it. A trim moves the start of the kept turns and
invalidates the cache anyway; folding exactly the dropped turns, and nothing
between trims, means the summary costs no cache between two trims.

Folding ahead: when the turn cap will trim on the next turn (predictable: it
depends only on the turn count), the turns it will drop are folded during this
turn into a *staged* summary (``summary_next``, ``summary_next_upto``), not
shown yet. The turn whose window has dropped everything the staged summary
covers shows it (:func:`shown_summary`) and promotes it. So the summary
changes on the very turn that trims, and a trim costs one uncached prompt, not
two. A trim nobody predicted (the token budget) folds when it happens, and
the next turn shows the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sessions.messages import ChatMessage
from sessions.prompt import PastTurn

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "GREETING_MARK",
    "SUMMARY_FIELD",
    "SUMMARY_HEADING",
    "SUMMARY_UPTO_FIELD",
    "fold_mark",
    "fold_messages",
    "SUMMARY_NEXT_FIELD",
    "SUMMARY_NEXT_UPTO_FIELD",
    "shown_summary",
    "summary_block",
    "turns_to_fold",
]

#: Meta hash fields (``keys.conversation_meta``) the summary is stored in.
SUMMARY_FIELD = "summary"
SUMMARY_UPTO_FIELD = "summary_upto"
#: The staged summary, folded ahead of the trim that will show it.
SUMMARY_NEXT_FIELD = "summary_next"
SUMMARY_NEXT_UPTO_FIELD = "summary_next_upto"

#: The mark of a turn without an exchange id (a character's greeting, always the
#: first turn). Exchange ids are turn ids (``t_<hex>``), so it cannot collide.
GREETING_MARK = "greeting"

SUMMARY_HEADING = "Summary of the earlier conversation:"

#: What the summarising model is asked for when the operator configures nothing.
#: ``{max_words}`` is replaced by the length bound.
DEFAULT_INSTRUCTIONS = (
    "You keep the memory of a long conversation between a user and an AI companion. "
    "Update the summary so far with the new part of the conversation below. Keep what "
    "matters for continuing the conversation later: names, relationships, facts about the "
    "user and their life, preferences, feelings and how they changed, promises and plans, "
    "and open questions. Write in the third person (\"the user\", \"the companion\", or "
    "their names), in plain sentences, concise: at most {max_words} words. Drop small "
    "talk. Answer with the updated summary only."
)


def fold_mark(turn: PastTurn) -> str:
    """What ``summary_upto`` stores for ``turn``: its exchange id, or :data:`GREETING_MARK`."""
    return turn.exchange_id or GREETING_MARK


def shown_summary(meta: Mapping[str, str], dropped: Sequence[PastTurn] = ()) -> tuple[str, str, bool]:
    """(text, upto, staged): the summary a prompt whose window dropped ``dropped`` shows.

    The staged summary once the window has dropped every turn it covers (its
    ``upto`` is among ``dropped``); ``staged`` then says it still has to be
    promoted. Otherwise the stored one.
    """
    staged_upto = meta.get(SUMMARY_NEXT_UPTO_FIELD, "")
    if staged_upto and meta.get(SUMMARY_NEXT_FIELD) and any(fold_mark(t) == staged_upto for t in dropped):
        return meta[SUMMARY_NEXT_FIELD], staged_upto, True
    return meta.get(SUMMARY_FIELD, ""), meta.get(SUMMARY_UPTO_FIELD, ""), False


def summary_block(meta: Mapping[str, str], dropped: Sequence[PastTurn] = ()) -> str:
    """The text placed in ``Context.memory``: the shown summary under a heading, or ""."""
    summary = shown_summary(meta, dropped)[0].strip()
    if not summary:
        return ""
    return f"{SUMMARY_HEADING}\n{summary}"


def turns_to_fold(dropped: Sequence[PastTurn], meta: Mapping[str, str]) -> list[PastTurn]:
    """The dropped turns the shown summary does not cover yet, oldest first.

    ``dropped`` are the turns the window left out (or, folding ahead, will
    leave out), oldest first. The summary covers everything up to its
    ``upto`` inclusive (see :func:`shown_summary`); only the turns after it
    are folded. When that mark is not among ``dropped`` (no summary yet, or
    it covers turns older than the history that was read), all of them are.
    """
    upto = shown_summary(meta, dropped)[1]
    if upto:
        for index in range(len(dropped) - 1, -1, -1):
            if fold_mark(dropped[index]) == upto:
                return list(dropped[index + 1:])
    return list(dropped)


def _transcript(turns: Sequence[PastTurn]) -> str:
    lines: list[str] = []
    for turn in turns:
        if turn.user:
            lines.append(f"User: {turn.user}")
        if turn.assistant:
            lines.append(f"Companion: {turn.assistant}")
    return "\n".join(lines)


def fold_messages(previous_summary: str, turns: Sequence[PastTurn], *, instructions: str,
                  max_summary_words: int) -> list[ChatMessage]:
    """The chat that asks a model to fold ``turns`` into ``previous_summary``.

    ``instructions`` (the operator's, or :data:`DEFAULT_INSTRUCTIONS` when
    empty) go in the system message, ``{max_words}`` in them replaced by
    ``max_summary_words``; the previous summary and the transcript of the new
    turns go in one user message.
    """
    text = (instructions.strip() or DEFAULT_INSTRUCTIONS).replace("{max_words}", str(max(1, max_summary_words)))
    previous = previous_summary.strip() or "(nothing yet: this is the start of the conversation)"
    request = (
        f"Summary so far:\n{previous}\n\n"
        f"New part of the conversation:\n{_transcript(turns) or '(empty)'}\n\n"
        "Write the updated summary."
    )
    return [ChatMessage("system", text), ChatMessage("user", request)]
