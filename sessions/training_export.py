"""Training rows from stored exchanges, in the formats TRL's trainers read (pure: no I/O).

TRL's dataset formats ("Dataset formats and types" in its documentation),
conversational variants, one JSON object per line:

- preference (``DPOTrainer``): ``{"prompt": [messages], "chosen": [assistant
  message], "rejected": [assistant message]}``, the prompt kept apart from the
  two completions;
- language modeling (``SFTTrainer``): ``{"messages": [messages]}``.

Rows carry only those columns: TRL's documentation lists no metadata columns,
so none are added.

Which replies are preferred (docs/protocol.md additions 19 and 20):

- chosen: every alternative rated +1; when none is, the one the user selected
  with ``turn.select``, unless they rated it -1;
- rejected: every alternative rated -1 and, only when the user selected one
  explicitly, every other alternative they did not rate +1 (the default
  selection of the newest reply says nothing about the user's taste);
- replies with no text are never used, nor pairs whose two texts are equal,
  and an exchange without a prompt gives no rows.

Rows come out in the order of the alternatives (generation order), chosen
first then rejected, so the same records always give the same file.
"""

from __future__ import annotations

from typing import Any

from sessions.training import Alternative, TrainingRecord

__all__ = ["chosen_and_rejected", "dpo_rows", "sft_rows"]


def _usable(alt: Alternative) -> bool:
    return bool(alt.text.strip())


def chosen_and_rejected(record: TrainingRecord) -> tuple[list[Alternative], list[Alternative]]:
    """The preferred and dispreferred replies of ``record``, each in generation order."""
    snapshot = record.snapshot
    alternatives = [alt for alt in snapshot.alternatives if _usable(alt)]

    def rating(alt: Alternative) -> int:
        given = record.ratings.get(alt.turn_id)
        return given.rating if given is not None else 0

    chosen = [alt for alt in alternatives if rating(alt) == 1]
    if not chosen and snapshot.selected is not None:
        chosen = [alt for alt in alternatives if alt.turn_id == snapshot.selected and rating(alt) != -1]
    explicit = snapshot.selected is not None
    rejected = [alt for alt in alternatives
                if rating(alt) == -1 or (explicit and alt.turn_id != snapshot.selected and rating(alt) != 1)]
    return chosen, rejected


def _prompt(record: TrainingRecord) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in record.snapshot.prompt]


def _assistant(alt: Alternative) -> dict[str, str]:
    return {"role": "assistant", "content": alt.text}


def dpo_rows(record: TrainingRecord) -> list[dict[str, Any]]:
    """One preference row per (chosen, rejected) pair of ``record``."""
    prompt = _prompt(record)
    if not prompt:
        return []
    chosen, rejected = chosen_and_rejected(record)
    return [{"prompt": prompt, "chosen": [_assistant(good)], "rejected": [_assistant(bad)]}
            for good in chosen for bad in rejected if good.text != bad.text]


def sft_rows(record: TrainingRecord) -> list[dict[str, Any]]:
    """One conversation per chosen reply of ``record``: the prompt, then the reply."""
    prompt = _prompt(record)
    if not prompt:
        return []
    chosen, _ = chosen_and_rejected(record)
    return [{"messages": [*prompt, _assistant(good)]} for good in chosen]
