"""Characters: Character Card V1/V2/V3 import and export, macros, and the persona prompt.

Pure functions, no I/O. Companion apps exchange characters as "character
cards", a JSON map (often base64 inside a PNG, see :mod:`sessions.card_png`).
Three generations exist and all are read here:

- V1 (legacy TavernAI): ``name``, ``description``, ``personality``,
  ``scenario``, ``first_mes``, ``mes_example`` at the top level, no ``spec``.
- V2 (``spec: "chara_card_v2"``, ``spec_version: "2.0"``): the fields move
  under ``data`` and gain ``creator_notes``, ``system_prompt``,
  ``post_history_instructions``, ``alternate_greetings``, ``character_book``,
  ``tags``, ``creator``, ``character_version`` and ``extensions``.
- V3 (``spec: "chara_card_v3"``, ``spec_version: "3.0"``): V2's ``data`` plus
  ``nickname``, ``creator_notes_multilingual``, ``source``,
  ``group_only_greetings``, ``creation_date``, ``modification_date``, ``assets``.

Rapport keeps its own settings inside the card so that export and import
carry them (docs/protocol.md, addition 18): ``data.extensions.rapport`` =
{``sampling``? {``temperature``, ``top_p``, ``max_tokens``}, ``lora``?}. The
V2 spec asks applications to keep unknown ``extensions`` keys, so the whole
map is stored verbatim and written back on export (only ``rapport`` itself is
kept in the canonical form an export writes).

Reading is lenient where the ecosystem is sloppy (a missing or ``null`` text
field is the empty string, as many exporters omit fields the spec calls
required) and strict where a value could hurt: wrong types, sizes over the
limits, and Rapport's own extension values are refused with a message naming
the field.
"""

from __future__ import annotations

import copy
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import BadRequest

# The card JSON's size cap lives with the PNG reader, which applies it to the
# decoded chunk; re-exported here because the JSON upload path applies it too.
from sessions.card_png import MAX_CARD_JSON_BYTES as MAX_CARD_JSON_BYTES
from sessions.card_png import MAX_PNG_BYTES, PNG_SIGNATURE, decode_card_json, read_card_png

SPEC_V1 = "chara_card_v1"
SPEC_V2 = "chara_card_v2"
SPEC_V3 = "chara_card_v3"

#: Every free-text field (description, greetings, examples, ...), in UTF-8 bytes.
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_NAME_CHARS = 128
#: ``creator``, ``character_version`` and each tag.
MAX_SHORT_FIELD_CHARS = 128
MAX_GREETINGS = 200
MAX_TAGS = 64
MAX_BOOK_ENTRIES = 2_000
#: Nesting of ``extensions`` and ``character_book``: deeper maps are not card data.
MAX_JSON_DEPTH = 32
#: Matches turn.start's ``options.max_tokens`` bound (protocol/frames.py).
MAX_SAMPLING_MAX_TOKENS = 1_000_000
#: A character id chosen by an operator: the same alphabet as a slug plus
#: upper case, dot and underscore; ≤ 128 characters like turn.start.character_id.
CHARACTER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: A LoRA adapter's name as vLLM's ``--lora-modules`` takes it.
LORA_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_SLUG_CHARS = 64
SUMMARY_DESCRIPTION_CHARS = 300

# The V1 fields, which V2/V3 keep under ``data``.
_V1_TEXT_FIELDS = ("description", "personality", "scenario", "first_mes", "mes_example")
# The V2 free-text fields on top of V1's.
_V2_TEXT_FIELDS = ("creator_notes", "system_prompt", "post_history_instructions")
_RAPPORT_KEYS = frozenset({"sampling", "lora"})
_SAMPLING_KEYS = frozenset({"temperature", "top_p", "max_tokens"})


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The character's defaults for a turn's options; ``None`` leaves the server's."""

    temperature: float | None = None  # 0..2
    top_p: float | None = None  # (0..1]
    max_tokens: int | None = None  # ≥ 1

    def to_json(self) -> dict[str, Any]:
        """The non-empty fields, as ``extensions.rapport.sampling`` holds them."""
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                  ("max_tokens", self.max_tokens)) if v is not None}


@dataclass(frozen=True, slots=True)
class Character:
    """One stored character: the card's fields, normalised, plus Rapport's settings."""

    id: str
    name: str
    description: str
    personality: str
    scenario: str
    first_mes: str
    alternate_greetings: tuple[str, ...]
    mes_example: str
    system_prompt: str
    post_history_instructions: str
    creator_notes: str
    creator: str
    character_version: str
    tags: tuple[str, ...]
    #: Verbatim; only checked to be a map whose ``entries`` is a list (for a lorebook feature).
    character_book: dict[str, Any] | None
    #: The card's ``data.extensions`` verbatim (JSON-safe), ``rapport`` included
    #: (in canonical form: absent when the character has no Rapport settings).
    extensions: dict[str, Any]
    sampling: SamplingDefaults
    lora: str | None
    #: What the character was imported from: SPEC_V1, SPEC_V2 or SPEC_V3.
    spec: str
    nickname: str = ""

    def to_json(self) -> dict[str, Any]:
        """The storage form: a JSON-safe map that :meth:`from_json` reads back."""
        return {
            "id": self.id,
            "spec": self.spec,
            "name": self.name,
            "nickname": self.nickname,
            "description": self.description,
            "personality": self.personality,
            "scenario": self.scenario,
            "first_mes": self.first_mes,
            "alternate_greetings": list(self.alternate_greetings),
            "mes_example": self.mes_example,
            "system_prompt": self.system_prompt,
            "post_history_instructions": self.post_history_instructions,
            "creator_notes": self.creator_notes,
            "creator": self.creator,
            "character_version": self.character_version,
            "tags": list(self.tags),
            "character_book": self.character_book,
            "extensions": self.extensions,
            "sampling": self.sampling.to_json(),
            "lora": self.lora,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Character:
        """Reads :meth:`to_json`'s form back, checking it like a card (BadRequest if not)."""
        if not isinstance(obj, dict):
            raise BadRequest("a stored character must be a map")
        spec = obj.get("spec")
        if spec not in (SPEC_V1, SPEC_V2, SPEC_V3):
            raise BadRequest(f"a stored character has an unknown spec {spec!r}")
        stored_id = obj.get("id")
        if not isinstance(stored_id, str):
            raise BadRequest("a stored character has no 'id'")
        # The storage form holds every field whatever the card's spec was.
        character = _from_data(obj, spec=spec, character_id=stored_id, where="", shape=SPEC_V3)
        # The stored sampling and lora are authoritative over extensions.rapport:
        # they are what the character was last saved with.
        sampling = _sampling_of(obj.get("sampling"), "sampling")
        lora = _lora_of(obj.get("lora"), "lora")
        return _replace_settings(character, sampling, lora)


def _replace_settings(character: Character, sampling: SamplingDefaults, lora: str | None) -> Character:
    fields = {name: getattr(character, name) for name in Character.__dataclass_fields__}
    fields.update(sampling=sampling, lora=lora,
                  extensions=_with_rapport(character.extensions, sampling, lora))
    return Character(**fields)


# ---------------------------------------------------------------- parsing


def parse_card(obj: Any, *, character_id: str | None = None) -> Character:
    """A V1, V2 or V3 card map as a Character; the id defaults to ``slugify(name)``.

    Raises BadRequest naming the problem: not a map, an unknown ``spec``, a
    missing ``data`` or ``name``, a field of the wrong type or over its limit,
    or a bad ``extensions.rapport`` value.
    """
    if not isinstance(obj, dict):
        raise BadRequest(f"a character card must be a JSON object, not {_json_type(obj)}")
    if "spec" not in obj:
        # V1 has no spec; its fields sit at the top level.
        if "name" not in obj:
            raise BadRequest("not a character card: no 'spec' and no 'name'")
        return _from_data(obj, spec=SPEC_V1, character_id=character_id, where="")
    spec = obj["spec"]
    if spec == SPEC_V2:
        _check_spec_version(obj.get("spec_version"), major="2")
    elif spec == SPEC_V3:
        _check_spec_version(obj.get("spec_version"), major="3")
    else:
        raise BadRequest(f"unsupported card spec {spec!r}: expected {SPEC_V2!r} or {SPEC_V3!r}"
                         " (or a V1 card without 'spec')")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise BadRequest(f"a {spec} card needs a 'data' object")
    return _from_data(data, spec=spec, character_id=character_id, where="data.")


def parse_card_bytes(raw: bytes, content_type: str | None, *, character_id: str | None = None) -> Character:
    """A card upload as a Character: JSON, or a PNG (recognised by its signature).

    ``content_type`` only matters when it claims a PNG that is not one; the
    bytes themselves decide otherwise, because clients label uploads loosely.
    """
    if raw.startswith(PNG_SIGNATURE):
        if len(raw) > MAX_PNG_BYTES:
            raise BadRequest(f"the PNG card is larger than {MAX_PNG_BYTES} bytes")
        return parse_card(read_card_png(raw), character_id=character_id)
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "image/png":
        raise BadRequest("the upload is labelled image/png but is not a PNG")
    if len(raw) > MAX_CARD_JSON_BYTES:
        raise BadRequest(f"the card JSON is larger than {MAX_CARD_JSON_BYTES} bytes")
    return parse_card(decode_card_json(raw, "the card"), character_id=character_id)


def _check_spec_version(value: Any, *, major: str) -> None:
    # Minor versions are compatible by the specs' own rule; a missing version is
    # common in hand-made cards and harmless.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"'spec_version' must be a string like \"{major}.0\"")
    if str(value).split(".", 1)[0] != major:
        raise BadRequest(f"'spec_version' {value!r} does not match the spec (expected {major}.x)")


def _from_data(data: Mapping[str, Any], *, spec: str, character_id: str | None, where: str,
               shape: str | None = None) -> Character:
    """The fields of ``data`` as laid out by ``shape`` (default: the spec's own layout)."""
    shape = shape or spec
    name = data.get("name")
    if name is None:
        raise BadRequest(f"the card has no '{where}name'")
    if not isinstance(name, str):
        raise BadRequest(f"'{where}name' must be a string, not {_json_type(name)}")
    if not name.strip():
        raise BadRequest(f"'{where}name' is empty")
    _check_unicode(name, f"{where}name")
    if len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"'{where}name' is longer than {MAX_NAME_CHARS} characters")
    texts = {key: _text(data, key, where) for key in _V1_TEXT_FIELDS}
    if shape != SPEC_V1:
        texts.update({key: _text(data, key, where) for key in _V2_TEXT_FIELDS})
    extensions = _extensions(data.get("extensions") if shape != SPEC_V1 else None, where)
    rapport = extensions.get("rapport")
    if rapport is None:
        sampling, lora = SamplingDefaults(), None
    else:
        sampling, lora = _rapport_settings(rapport, f"{where}extensions.rapport")
    return Character(
        id=_character_id(character_id, name),
        name=name,
        description=texts["description"],
        personality=texts["personality"],
        scenario=texts["scenario"],
        first_mes=texts["first_mes"],
        alternate_greetings=_greetings(data, where) if shape != SPEC_V1 else (),
        mes_example=texts["mes_example"],
        system_prompt=texts.get("system_prompt", ""),
        post_history_instructions=texts.get("post_history_instructions", ""),
        creator_notes=texts.get("creator_notes", ""),
        creator=_short(data, "creator", where) if shape != SPEC_V1 else "",
        character_version=_short(data, "character_version", where) if shape != SPEC_V1 else "",
        tags=_tags(data, where) if shape != SPEC_V1 else (),
        character_book=copy.deepcopy(_book(data.get("character_book"), where)) if shape != SPEC_V1 else None,
        # Copied, so the caller's map is never shared; 'rapport' in the canonical
        # form an export writes, so import → export → import gives back the same.
        extensions=_with_rapport(copy.deepcopy(extensions), sampling, lora),
        sampling=sampling,
        lora=lora,
        spec=spec,
        nickname=_nickname(data, where) if shape == SPEC_V3 else "",
    )


def _character_id(character_id: str | None, name: str) -> str:
    if character_id is None:
        return slugify(name)
    if not isinstance(character_id, str) or not CHARACTER_ID_PATTERN.fullmatch(character_id):
        raise BadRequest("a character id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'")
    return character_id


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"'{where}{key}' must be a string, not {_json_type(value)}")
    _check_text_size(value, f"{where}{key}")
    return value


def _check_text_size(value: str, path: str) -> None:
    _check_unicode(value, path)
    # Cheap bound first: a str never takes more than 4 UTF-8 bytes per character.
    if len(value) * 4 > MAX_TEXT_FIELD_BYTES and len(value.encode("utf-8")) > MAX_TEXT_FIELD_BYTES:
        raise BadRequest(f"'{path}' is longer than {MAX_TEXT_FIELD_BYTES} bytes")


def _check_unicode(value: str, path: str) -> None:
    """Refuses lone surrogates: JSON's ``\\ud800`` escapes parse, but no UTF-8 can store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{path}' holds a lone surrogate, which is not a character") from None


def _short(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _text(data, key, where)
    if len(value) > MAX_SHORT_FIELD_CHARS:
        raise BadRequest(f"'{where}{key}' is longer than {MAX_SHORT_FIELD_CHARS} characters")
    return value


def _nickname(data: Mapping[str, Any], where: str) -> str:
    value = _text(data, "nickname", where)
    if len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"'{where}nickname' is longer than {MAX_NAME_CHARS} characters")
    return value


def _string_list(data: Mapping[str, Any], key: str, where: str, max_items: int) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{where}{key}' must be a list of strings, not {_json_type(value)}")
    if len(value) > max_items:
        raise BadRequest(f"'{where}{key}' has more than {max_items} items")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f"'{where}{key}[{i}]' must be a string, not {_json_type(item)}")
    return value


def _greetings(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    greetings = _string_list(data, "alternate_greetings", where, MAX_GREETINGS)
    for i, greeting in enumerate(greetings):
        _check_text_size(greeting, f"{where}alternate_greetings[{i}]")
    return tuple(greetings)


def _tags(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    tags = _string_list(data, "tags", where, MAX_TAGS)
    for i, tag in enumerate(tags):
        if len(tag) > MAX_SHORT_FIELD_CHARS:
            raise BadRequest(f"'{where}tags[{i}]' is longer than {MAX_SHORT_FIELD_CHARS} characters")
    return tuple(tags)


def _book(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    path = f"{where}character_book"
    if not isinstance(value, dict):
        raise BadRequest(f"'{path}' must be an object, not {_json_type(value)}")
    entries = value.get("entries")
    if not isinstance(entries, list):
        raise BadRequest(f"'{path}.entries' must be a list")
    if len(entries) > MAX_BOOK_ENTRIES:
        raise BadRequest(f"'{path}.entries' has more than {MAX_BOOK_ENTRIES} entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadRequest(f"'{path}.entries[{i}]' must be an object, not {_json_type(entry)}")
    _check_json_safe(value, path, 0)
    return value


def _extensions(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{where}extensions' must be an object, not {_json_type(value)}")
    _check_json_safe(value, f"{where}extensions", 0)
    return value


def _check_json_safe(value: Any, path: str, depth: int) -> None:
    """Refuses what JSON cannot carry back out: non-string keys, NaN, other types."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"'{path}' is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadRequest(f"'{path}' has a key that is not a string")
            _check_unicode(key, path)
            _check_json_safe(item, path, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_safe(item, path, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"'{path}' holds a number JSON cannot carry")
    elif isinstance(value, str):
        _check_unicode(value, path)
    elif not (value is None or isinstance(value, int | bool)):
        raise BadRequest(f"'{path}' holds a value JSON cannot carry ({type(value).__name__})")


def _rapport_settings(value: Any, path: str) -> tuple[SamplingDefaults, str | None]:
    if not isinstance(value, dict):
        raise BadRequest(f"'{path}' must be an object, not {_json_type(value)}")
    unknown = sorted(set(value) - _RAPPORT_KEYS)
    if unknown:
        # Our own namespace: a typo here would silently do nothing, so it is refused.
        raise BadRequest(f"'{path}' has unknown keys {unknown}: expected 'sampling' and 'lora'")
    return _sampling_of(value.get("sampling"), f"{path}.sampling"), _lora_of(value.get("lora"), f"{path}.lora")


def _sampling_of(value: Any, path: str) -> SamplingDefaults:
    if value is None:
        return SamplingDefaults()
    if not isinstance(value, dict):
        raise BadRequest(f"'{path}' must be an object, not {_json_type(value)}")
    unknown = sorted(set(value) - _SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"'{path}' has unknown keys {unknown}: expected temperature, top_p, max_tokens")
    temperature = _number(value.get("temperature"), f"{path}.temperature")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise BadRequest(f"'{path}.temperature' must be between 0 and 2")
    top_p = _number(value.get("top_p"), f"{path}.top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadRequest(f"'{path}.top_p' must be greater than 0 and at most 1")
    max_tokens = value.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise BadRequest(f"'{path}.max_tokens' must be an integer, not {_json_type(max_tokens)}")
        if not 1 <= max_tokens <= MAX_SAMPLING_MAX_TOKENS:
            raise BadRequest(f"'{path}.max_tokens' must be between 1 and {MAX_SAMPLING_MAX_TOKENS}")
    return SamplingDefaults(temperature=temperature, top_p=top_p, max_tokens=max_tokens)


def _number(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{path}' must be a number, not {_json_type(value)}")
    if not math.isfinite(value):
        raise BadRequest(f"'{path}' must be a finite number")
    return float(value)


def _lora_of(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not LORA_NAME_PATTERN.fullmatch(value):
        raise BadRequest(f"'{path}' must be an adapter name of 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------- export


def _with_rapport(extensions: dict[str, Any], sampling: SamplingDefaults, lora: str | None) -> dict[str, Any]:
    """``extensions`` with ``rapport`` written from the typed settings (absent when empty)."""
    result = {k: v for k, v in extensions.items() if k != "rapport"}
    rapport: dict[str, Any] = {}
    if sampling_json := sampling.to_json():
        rapport["sampling"] = sampling_json
    if lora is not None:
        rapport["lora"] = lora
    if rapport:
        result["rapport"] = rapport
    return result


def _export_extensions(character: Character) -> dict[str, Any]:
    """The card's extensions with ``rapport`` rewritten from the typed settings."""
    return _with_rapport(character.extensions, character.sampling, character.lora)


def _export_data(character: Character) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": character.name,
        "description": character.description,
        "personality": character.personality,
        "scenario": character.scenario,
        "first_mes": character.first_mes,
        "mes_example": character.mes_example,
        "creator_notes": character.creator_notes,
        "system_prompt": character.system_prompt,
        "post_history_instructions": character.post_history_instructions,
        "alternate_greetings": list(character.alternate_greetings),
        "tags": list(character.tags),
        "creator": character.creator,
        "character_version": character.character_version,
        "extensions": _export_extensions(character),
    }
    # Optional in both specs; omitted rather than null, which some readers choke on.
    if character.character_book is not None:
        data["character_book"] = character.character_book
    return data


def card_v2(character: Character) -> dict[str, Any]:
    """The character as a Character Card V2 map (V3's ``nickname`` has no place in it)."""
    return {"spec": SPEC_V2, "spec_version": "2.0", "data": _export_data(character)}


def card_v3(character: Character) -> dict[str, Any]:
    """The character as a Character Card V3 map.

    V3's fields Rapport does not keep are written empty, as the spec requires
    them present: no multilingual notes, sources, group greetings or assets
    (a reader then uses the PNG itself as the icon).
    """
    data = _export_data(character)
    data.update(
        nickname=character.nickname,
        creator_notes_multilingual={},
        source=[],
        group_only_greetings=[],
        assets=[],
    )
    return {"spec": SPEC_V3, "spec_version": "3.0", "data": data}


# ---------------------------------------------------------------- names and macros


def slugify(name: str) -> str:
    """A default id from a name: lower-case ASCII letters, digits and '-', ≤ 64 chars.

    Accented letters lose their accents (``Zoë`` → ``zoe``); a name with no
    Latin letters or digits at all becomes ``character``.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")
    slug = slug[:MAX_SLUG_CHARS].rstrip("-")
    return slug or "character"


# One pass over the text, so a name that itself contains "{{user}}" is not expanded again.
_MACRO = re.compile(r"\{\{(char|user|original)\}\}|<(bot|user)>", re.IGNORECASE)


def _expand(text: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = (match.group(1) or match.group(2)).lower()
        key = "char" if key == "bot" else key
        return values.get(key, match.group(0))

    return _MACRO.sub(replace, text)


def apply_macros(text: str, *, char: str, user: str) -> str:
    """``{{char}}``/``<BOT>`` → the character's name, ``{{user}}``/``<USER>`` → the user's.

    Case-insensitive, as SillyTavern reads them; any other ``{{...}}`` is left as is.
    """
    return _expand(text, {"char": char, "user": user})


# ---------------------------------------------------------------- the persona prompt


@dataclass(frozen=True, slots=True)
class Persona:
    """What a character adds to the prompt (docs/protocol.md, addition 18)."""

    character_id: str
    #: The one static system message, first in the prompt so vLLM's prefix cache
    #: serves it to every conversation with this character.
    system: str
    #: Sent as a system message after the newest user message; "" if none.
    post_history: str


_START = re.compile(r"^[ \t]*<START>[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _example_block(mes_example: str) -> str:
    """``mes_example``'s ``<START>``-separated dialogues as plain labelled blocks.

    ``<START>`` is a SillyTavern separator, not text the model should imitate.
    """
    dialogues = [part.strip() for part in _START.split(mes_example)]
    return "\n\n".join(f"Example conversation:\n{dialogue}" for dialogue in dialogues if dialogue)


def persona_of(character: Character, *, default_system_prompt: str, user_name: str = "User") -> Persona:
    """The system message and post-history instructions for a conversation.

    Order: the card's ``system_prompt`` (``{{original}}`` in it is the server's
    default prompt, per the V2 spec; the default alone when the card has
    none), then description, personality, scenario and example dialogues,
    with blank lines between the non-empty parts. Note that ``{{user}}``
    makes the text differ between users from its first occurrence on; the
    prefix before it is still shared.
    """
    names = {"char": character.name, "user": user_name}
    # Macros in the server's default prompt are expanded the same way whether it
    # stands alone or is pulled in by {{original}}.
    default = _expand(default_system_prompt, names)
    if character.system_prompt.strip():
        system_prompt = _expand(character.system_prompt, {**names, "original": default})
    else:
        system_prompt = default
    parts = [
        character.description,
        f"{{{{char}}}}'s personality: {character.personality.strip()}" if character.personality.strip() else "",
        f"Scenario: {character.scenario.strip()}" if character.scenario.strip() else "",
        _example_block(character.mes_example),
    ]
    expanded = [system_prompt.strip(), *(_expand(part, names).strip() for part in parts)]
    system = "\n\n".join(part for part in expanded if part)
    # V2: {{original}} in post_history_instructions is the app's own default
    # instructions; Rapport has none, so it stands for nothing.
    post_history = _expand(character.post_history_instructions, {**names, "original": ""}).strip()
    return Persona(character_id=character.id, system=system, post_history=post_history)


def greeting_of(character: Character, index: int = 0, *, user_name: str = "User") -> str:
    """Greeting ``index`` with macros applied: 0 is ``first_mes``, n is ``alternate_greetings[n-1]``.

    "" when the card has no greeting; BadRequest for an index the card does not have.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise BadRequest("'greeting' must be an integer")
    if index == 0:
        text = character.first_mes
    elif 1 <= index <= len(character.alternate_greetings):
        text = character.alternate_greetings[index - 1]
    else:
        raise BadRequest(f"'greeting' must be between 0 and {len(character.alternate_greetings)} for this character")
    return apply_macros(text, char=character.name, user=user_name)


def summary(character: Character) -> dict[str, Any]:
    """A short form for listings."""
    return {
        "id": character.id,
        "name": character.name,
        "nickname": character.nickname,
        "description": character.description[:SUMMARY_DESCRIPTION_CHARS],
        "tags": list(character.tags),
        "creator": character.creator,
        "greetings": (1 if character.first_mes else 0) + len(character.alternate_greetings),
        "has_lora": character.lora is not None,
        "lora": character.lora,
    }
