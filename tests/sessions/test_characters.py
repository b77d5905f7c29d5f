"""Character cards (sessions/characters.py): V1/V2/V3 import, export, limits, macros, persona."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import BadRequest
from sessions.card_png import write_card_png
from sessions.characters import (
    MAX_CARD_JSON_BYTES,
    MAX_GREETINGS,
    MAX_NAME_CHARS,
    MAX_TAGS,
    MAX_TEXT_FIELD_BYTES,
    SPEC_V1,
    SPEC_V2,
    SPEC_V3,
    Character,
    SamplingDefaults,
    apply_macros,
    card_v2,
    card_v3,
    greeting_of,
    parse_card,
    parse_card_bytes,
    persona_of,
    slugify,
    summary,
)

CARDS = Path(__file__).resolve().parents[1] / "fixtures" / "cards"


def fixture_bytes(name: str) -> bytes:
    return (CARDS / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    card = json.loads(fixture_bytes(name))
    assert isinstance(card, dict)
    return card


def v2(**data: Any) -> dict[str, Any]:
    """A minimal V2 card with ``data`` fields overridden."""
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Aria", **data}}


def bad(obj: Any, *fragments: str) -> str:
    """Parses ``obj``, expecting BadRequest whose message holds every fragment."""
    with pytest.raises(BadRequest) as caught:
        parse_card(obj)
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    assert caught.value.code == "bad_request"
    return caught.value.message


# ---------------------------------------------------------------- parsing the three specs


def test_v1_card_reads_top_level_fields() -> None:
    character = parse_card({"name": "Old Tom", "description": "A sailor.", "personality": "gruff",
                            "scenario": "a tavern", "first_mes": "Ahoy.", "mes_example": "<START>\nhi"})
    assert character.spec == SPEC_V1
    assert character.id == "old-tom"
    assert (character.name, character.description, character.personality) == ("Old Tom", "A sailor.", "gruff")
    assert (character.scenario, character.first_mes, character.mes_example) == ("a tavern", "Ahoy.", "<START>\nhi")
    assert character.alternate_greetings == () and character.tags == ()
    assert character.extensions == {} and character.sampling == SamplingDefaults() and character.lora is None
    assert character.character_book is None and character.nickname == ""


def test_v2_png_fixture_reads_every_field() -> None:
    character = parse_card_bytes(fixture_bytes("v2_card.png"), "image/png")
    assert character.spec == SPEC_V2
    assert character.id == "mira-vale"
    assert character.name == "Mira Vale"
    assert character.first_mes.startswith("*{{char}} sets a mug")
    assert len(character.alternate_greetings) == 2
    assert character.tags == ("slice of life", "sea", "original")
    assert character.creator == "rapport-tests" and character.character_version == "1.2"
    assert character.system_prompt == "{{original}}\nStay in character as {{char}}."
    assert character.post_history_instructions == "Keep replies under 120 words."
    assert character.sampling == SamplingDefaults(temperature=0.8, top_p=0.95, max_tokens=300)
    assert character.lora is None
    # Unknown extensions are kept verbatim (the V2 spec asks apps to preserve them).
    assert character.extensions["talkativeness"] == "0.5"


def test_v3_json_fixture_reads_v3_fields_and_rapport_settings() -> None:
    character = parse_card_bytes(fixture_bytes("v3_card.json"), "application/json")
    assert character.spec == SPEC_V3
    assert character.id == "captain-oriel-thane"
    assert character.nickname == "Ori"
    assert len(character.alternate_greetings) == 3
    assert character.character_book is not None
    assert [entry["keys"] for entry in character.character_book["entries"]] == [["Kestrel", "airship"],
                                                                                 ["Port Vantage"]]
    assert character.sampling == SamplingDefaults(temperature=1.1, top_p=0.9, max_tokens=512)
    assert character.lora == "airship-captain-v1"
    assert character.extensions["depth_prompt"] == {"prompt": "", "depth": 4}


def test_explicit_id_and_missing_or_null_fields_are_empty() -> None:
    character = parse_card(v2(description=None, first_mes=None), character_id="My_Char.1")
    assert character.id == "My_Char.1"
    assert character.description == "" and character.first_mes == "" and character.system_prompt == ""
    assert character.alternate_greetings == () and character.character_book is None


def test_integer_spec_version_and_minor_versions_are_accepted() -> None:
    card = v2()
    card["spec_version"] = "2.1"
    assert parse_card(card).spec == SPEC_V2
    card["spec_version"] = 2
    assert parse_card(card).spec == SPEC_V2
    del card["spec_version"]
    assert parse_card(card).spec == SPEC_V2


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fixture", ["v2_card.png", "v3_card.json", "long_character_v2.json"])
def test_round_trips_through_v2_and_v3_exports(fixture: str) -> None:
    original = parse_card_bytes(fixture_bytes(fixture), None)
    via_v3 = parse_card(json.loads(json.dumps(card_v3(original))), character_id=original.id)
    assert via_v3 == dataclasses.replace(original, spec=SPEC_V3)
    via_v2 = parse_card(json.loads(json.dumps(card_v2(original))), character_id=original.id)
    # V2 has no nickname: everything else survives.
    assert via_v2 == dataclasses.replace(original, spec=SPEC_V2, nickname="")


def test_round_trip_through_png_export() -> None:
    original = parse_card_bytes(fixture_bytes("v3_card.json"), None)
    png = write_card_png(v2=card_v2(original), v3=card_v3(original))
    again = parse_card_bytes(png, "image/png", character_id=original.id)
    assert again == original  # ccv3 preferred: the nickname is back


def test_storage_form_round_trips() -> None:
    for fixture in ("v2_card.png", "v3_card.json"):
        character = parse_card_bytes(fixture_bytes(fixture), None)
        stored = json.loads(json.dumps(character.to_json()))
        assert Character.from_json(stored) == character
    v1 = parse_card({"name": "Old Tom"})
    assert Character.from_json(json.loads(json.dumps(v1.to_json()))) == v1


def test_storage_form_is_checked() -> None:
    character = parse_card(v2())
    stored = character.to_json()
    with pytest.raises(BadRequest, match="spec"):
        Character.from_json({**stored, "spec": "nope"})
    with pytest.raises(BadRequest, match="temperature"):
        Character.from_json({**stored, "sampling": {"temperature": 9}})


def test_export_shapes() -> None:
    character = parse_card_bytes(fixture_bytes("v3_card.json"), None)
    exported_v2 = card_v2(character)
    assert exported_v2["spec"] == "chara_card_v2" and exported_v2["spec_version"] == "2.0"
    assert "nickname" not in exported_v2["data"]
    assert exported_v2["data"]["extensions"]["rapport"] == {
        "sampling": {"temperature": 1.1, "top_p": 0.9, "max_tokens": 512}, "lora": "airship-captain-v1"}
    exported_v3 = card_v3(character)
    assert exported_v3["spec"] == "chara_card_v3" and exported_v3["spec_version"] == "3.0"
    assert exported_v3["data"]["nickname"] == "Ori"
    assert exported_v3["data"]["character_book"] == character.character_book
    for key in ("source", "group_only_greetings", "assets", "creator_notes_multilingual"):
        assert key in exported_v3["data"]
    # A character without Rapport settings exports no empty 'rapport' map.
    assert "rapport" not in card_v2(parse_card(v2()))["data"]["extensions"]


# ---------------------------------------------------------------- bad cards


def test_bad_spec_fixture() -> None:
    with pytest.raises(BadRequest, match="unsupported card spec 'chara_card_v9'"):
        parse_card_bytes(fixture_bytes("bad_spec.json"), "application/json")


@pytest.mark.parametrize(("obj", "fragments"), [
    ([1, 2], ("must be a JSON object", "a list")),
    ("card", ("must be a JSON object",)),
    ({"description": "no name, no spec"}, ("not a character card",)),
    ({"spec": "chara_card_v2", "spec_version": "3.0", "data": {"name": "A"}}, ("spec_version",)),
    ({"spec": "chara_card_v3", "spec_version": "2.0", "data": {"name": "A"}}, ("spec_version",)),
    ({"spec": "chara_card_v2", "spec_version": True, "data": {"name": "A"}}, ("spec_version",)),
    ({"spec": "chara_card_v2", "spec_version": "2.0"}, ("'data'",)),
    ({"spec": "chara_card_v2", "spec_version": "2.0", "data": []}, ("'data'",)),
    ({"spec": "chara_card_v2", "spec_version": "2.0", "data": {}}, ("data.name",)),
    ({"spec": 2, "data": {"name": "A"}}, ("unsupported card spec",)),
])
def test_malformed_cards(obj: Any, fragments: tuple[str, ...]) -> None:
    bad(obj, *fragments)


@pytest.mark.parametrize(("data", "fragments"), [
    ({"name": 5}, ("'data.name' must be a string", "a number")),
    ({"name": "   "}, ("'data.name' is empty",)),
    ({"name": "x" * (MAX_NAME_CHARS + 1)}, ("'data.name' is longer",)),
    ({"description": ["a"]}, ("'data.description' must be a string", "a list")),
    ({"first_mes": 1}, ("'data.first_mes'",)),
    ({"system_prompt": {}}, ("'data.system_prompt'",)),
    ({"description": "é" * (MAX_TEXT_FIELD_BYTES // 2 + 1)}, ("'data.description' is longer",)),
    ({"alternate_greetings": "hi"}, ("'data.alternate_greetings' must be a list",)),
    ({"alternate_greetings": ["ok", 3]}, ("'data.alternate_greetings[1]'",)),
    ({"alternate_greetings": ["g"] * (MAX_GREETINGS + 1)}, ("more than 200",)),
    ({"alternate_greetings": ["x" * (MAX_TEXT_FIELD_BYTES + 1)]}, ("'data.alternate_greetings[0]' is longer",)),
    ({"tags": ["t"] * (MAX_TAGS + 1)}, ("'data.tags' has more than 64",)),
    ({"tags": ["x" * 129]}, ("'data.tags[0]' is longer",)),
    ({"creator": "x" * 129}, ("'data.creator' is longer",)),
    ({"character_book": []}, ("'data.character_book' must be an object",)),
    ({"character_book": {"entries": {}}}, ("'data.character_book.entries' must be a list",)),
    ({"character_book": {"entries": ["x"]}}, ("'data.character_book.entries[0]'",)),
    ({"character_book": {"entries": [{"x": float("nan")}]}}, ("JSON cannot carry",)),
    ({"extensions": "x"}, ("'data.extensions' must be an object",)),
    ({"extensions": {"deep": json.loads("[" * 40 + "]" * 40)}}, ("nested more than",)),
    ({"extensions": {1: "x"}}, ("key that is not a string",)),
    ({"extensions": {"rapport": []}}, ("'data.extensions.rapport' must be an object",)),
    ({"extensions": {"rapport": {"temprature": 1}}}, ("unknown keys ['temprature']",)),
    ({"extensions": {"rapport": {"sampling": 1}}}, ("'data.extensions.rapport.sampling' must be an object",)),
    ({"extensions": {"rapport": {"sampling": {"temperature": 2.5}}}}, ("temperature' must be between 0 and 2",)),
    ({"extensions": {"rapport": {"sampling": {"temperature": "hot"}}}}, ("temperature' must be a number",)),
    ({"extensions": {"rapport": {"sampling": {"temperature": True}}}}, ("temperature' must be a number",)),
    ({"extensions": {"rapport": {"sampling": {"top_p": 0}}}}, ("top_p' must be greater than 0",)),
    ({"extensions": {"rapport": {"sampling": {"top_p": 1.5}}}}, ("top_p",)),
    ({"extensions": {"rapport": {"sampling": {"max_tokens": 0}}}}, ("max_tokens' must be between 1",)),
    ({"extensions": {"rapport": {"sampling": {"max_tokens": 10.5}}}}, ("max_tokens' must be an integer",)),
    ({"extensions": {"rapport": {"sampling": {"seed": 1}}}}, ("unknown keys ['seed']",)),
    ({"extensions": {"rapport": {"lora": "../../etc"}}}, ("'data.extensions.rapport.lora'",)),
    ({"extensions": {"rapport": {"lora": "x" * 65}}}, ("lora",)),
    ({"extensions": {"rapport": {"lora": 7}}}, ("lora",)),
])
def test_bad_fields_name_the_field(data: dict[str, Any], fragments: tuple[str, ...]) -> None:
    bad(v2(**data), *fragments)


def test_v3_nickname_limit() -> None:
    card = v2(nickname="n" * (MAX_NAME_CHARS + 1))
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    bad(card, "'data.nickname' is longer")


def test_limits_at_the_edge_are_accepted() -> None:
    character = parse_card(v2(
        name="n" * MAX_NAME_CHARS,
        description="x" * MAX_TEXT_FIELD_BYTES,
        alternate_greetings=["g"] * MAX_GREETINGS,
        tags=["t" * 128] * MAX_TAGS,
        extensions={"rapport": {"sampling": {"temperature": 0, "top_p": 1, "max_tokens": 1},
                                "lora": "a" * 64}},
    ))
    assert len(character.alternate_greetings) == MAX_GREETINGS
    assert character.sampling == SamplingDefaults(temperature=0.0, top_p=1.0, max_tokens=1)


def test_bad_character_ids() -> None:
    for bad_id in ("", "has space", "x" * 129, "a/b", "{tag}"):
        with pytest.raises(BadRequest, match="character id"):
            parse_card(v2(), character_id=bad_id)


@pytest.mark.parametrize(("raw", "content_type", "fragment"), [
    (b"\xff\xfe{}", "application/json", "not valid UTF-8"),
    (b'{"spec": ', None, "not valid JSON"),
    (b'{"name": "A", "x": NaN}', None, "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    (b" " * (MAX_CARD_JSON_BYTES + 1), None, "larger than"),
    (b'{"name": "A"}', "image/png", "not a PNG"),
    (b"\x89PNG\r\n\x1a\n\0\0", "image/png", "truncated"),
])
def test_bad_uploads(raw: bytes, content_type: str | None, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        parse_card_bytes(raw, content_type)


def test_upload_sniffs_png_whatever_the_label_and_tolerates_a_bom() -> None:
    assert parse_card_bytes(fixture_bytes("v2_card.png"), "application/octet-stream").name == "Mira Vale"
    assert parse_card_bytes(b"\xef\xbb\xbf" + json.dumps(v2()).encode(), "application/json; charset=utf-8").name \
        == "Aria"


def test_png_without_a_card_is_refused() -> None:
    with pytest.raises(BadRequest, match="no character card"):
        parse_card_bytes(fixture_bytes("no_card.png"), "image/png")
    with pytest.raises(BadRequest, match="not valid base64"):
        parse_card_bytes(fixture_bytes("bad_base64.png"), "image/png")


def test_parsing_does_not_change_the_input() -> None:
    card = fixture_json("v3_card.json")
    before = copy.deepcopy(card)
    parse_card(card)
    assert card == before


# ---------------------------------------------------------------- slugs and macros


@pytest.mark.parametrize(("name", "slug"), [
    ("Mira Vale", "mira-vale"),
    ("  Zoë & the Wolf!! ", "zoe-the-wolf"),
    ("初音ミク", "character"),
    ("---", "character"),
    ("A" * 100, "a" * 64),
    ("a" * 63 + " b", "a" * 63),  # no trailing dash after the cut
    ("R2-D2 (v2.0)", "r2-d2-v2-0"),
])
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_macros() -> None:
    assert apply_macros("{{char}} greets {{user}}.", char="Aria", user="Sam") == "Aria greets Sam."
    assert apply_macros("{{CHAR}}/{{User}}/<BOT>/<USER>/<bot>", char="A", user="U") == "A/U/A/U/A"
    assert apply_macros("{{random:a,b}} {{original}} {{ char }} {{char", char="A", user="U") \
        == "{{random:a,b}} {{original}} {{ char }} {{char"
    # One pass: a name that looks like a macro is not expanded again.
    assert apply_macros("{{user}} and {{char}}", char="A", user="{{char}}") == "{{char}} and A"


# ---------------------------------------------------------------- persona and greetings


def full_character(**data: Any) -> Character:
    fields = {"description": "{{char}} is a pilot.", "personality": "brave", "scenario": "{{user}} boards.",
              "mes_example": "<START>\n{{user}}: hi\n{{char}}: hello\n<start>\n\n<BOT>: again\n<START>\n",
              "system_prompt": "", "post_history_instructions": ""}
    fields.update(data)
    return parse_card(v2(**fields))


def test_persona_order_and_blocks() -> None:
    persona = persona_of(full_character(), default_system_prompt="You are a roleplay partner.", user_name="Sam")
    assert persona.character_id == "aria"
    assert persona.system == (
        "You are a roleplay partner.\n\n"
        "Aria is a pilot.\n\n"
        "Aria's personality: brave\n\n"
        "Scenario: Sam boards.\n\n"
        "Example conversation:\nSam: hi\nAria: hello\n\n"
        "Example conversation:\nAria: again"
    )
    assert persona.post_history == ""


def test_persona_skips_empty_parts() -> None:
    persona = persona_of(parse_card(v2(scenario="  ", description="Only this.")), default_system_prompt="")
    assert persona.system == "Only this."
    assert persona_of(parse_card(v2()), default_system_prompt="").system == ""


def test_card_system_prompt_replaces_the_default_and_original_includes_it() -> None:
    own = persona_of(full_character(system_prompt="Be {{char}}."), default_system_prompt="DEFAULT")
    assert own.system.startswith("Be Aria.\n\nAria is a pilot.")
    assert "DEFAULT" not in own.system
    wrapped = persona_of(full_character(system_prompt="{{ORIGINAL}}\nAlso be {{char}}."),
                         default_system_prompt="DEFAULT for {{user}}", user_name="Sam")
    assert wrapped.system.startswith("DEFAULT for Sam\nAlso be Aria.\n\nAria is a pilot.")
    # {{original}} means something only in the system prompt.
    literal = persona_of(full_character(description="see {{original}}"), default_system_prompt="DEFAULT")
    assert "see {{original}}" in literal.system


def test_post_history_instructions() -> None:
    persona = persona_of(full_character(post_history_instructions="{{original}} Stay as {{char}}, {{user}}. "),
                         default_system_prompt="DEFAULT", user_name="Sam")
    assert persona.post_history == "Stay as Aria, Sam."


def test_persona_of_long_character_is_the_same_for_every_user() -> None:
    character = parse_card_bytes(fixture_bytes("long_character_v2.json"), None)
    first = persona_of(character, default_system_prompt="You are a roleplay partner.", user_name="Sam")
    assert len(first.system) > 6_000
    # Everything before the first {{user}} is shared: the whole description here.
    other = persona_of(character, default_system_prompt="You are a roleplay partner.", user_name="Kim")
    shared = len(character.description.split("{{user}}")[0])
    assert first.system[:shared] == other.system[:shared]


def test_greetings() -> None:
    character = parse_card_bytes(fixture_bytes("v2_card.png"), None)
    assert greeting_of(character, user_name="Sam") == "*Mira Vale sets a mug of tea down.* You're awake, Sam. " \
                                                      "The sea kept your boots."
    assert greeting_of(character, 1).startswith("*The lamp room hums.* Careful on the stairs, User;")
    assert greeting_of(character, 2, user_name="Jo") == "Storm's passing. You picked a bad night to learn to swim, Jo."
    for index in (3, -1):
        with pytest.raises(BadRequest, match="between 0 and 2"):
            greeting_of(character, index)
    with pytest.raises(BadRequest, match="integer"):
        greeting_of(character, True)
    assert greeting_of(parse_card(v2())) == ""


def test_summary() -> None:
    character = parse_card_bytes(fixture_bytes("v3_card.json"), None)
    assert summary(character) == {
        "id": "captain-oriel-thane", "name": "Captain Oriel Thane", "nickname": "Ori",
        "description": character.description, "tags": ["adventure", "airship"], "creator": "rapport-tests",
        "greetings": 4, "has_lora": True, "lora": "airship-captain-v1",
    }
    long = summary(parse_card_bytes(fixture_bytes("long_character_v2.json"), None))
    assert len(long["description"]) == 300 and long["has_lora"] is False and long["lora"] is None
    assert summary(parse_card(v2()))["greetings"] == 0


@pytest.mark.parametrize("rapport", [
    {}, {"sampling": {}}, {"lora": None}, {"sampling": {"temperature": 1, "top_p": None}},
    None,
])
def test_rapport_extension_is_canonical_so_round_trips_are_exact(rapport: Any) -> None:
    character = parse_card(v2(extensions={"other": [1, {"x": "y"}], "rapport": rapport}))
    assert character.extensions["other"] == [1, {"x": "y"}]
    assert parse_card(card_v2(character)) == character
    assert parse_card(card_v3(character)) == dataclasses.replace(character, spec=SPEC_V3)
    assert Character.from_json(json.loads(json.dumps(character.to_json()))) == character


def test_parsed_character_does_not_share_the_callers_maps() -> None:
    card = fixture_json("v3_card.json")
    character = parse_card(card)
    card["data"]["extensions"]["depth_prompt"]["depth"] = 99
    card["data"]["character_book"]["entries"].clear()
    assert character.extensions["depth_prompt"]["depth"] == 4
    assert character.character_book is not None and len(character.character_book["entries"]) == 2


@pytest.mark.parametrize("raw", [
    b'{"name": "A\\ud800"}',
    b'{"spec": "chara_card_v2", "data": {"name": "A", "description": "x\\udfff"}}',
    b'{"spec": "chara_card_v2", "data": {"name": "A", "extensions": {"k\\ud800": 1}}}',
    b'{"spec": "chara_card_v2", "data": {"name": "A", "character_book": {"entries": [{"c": "\\ud800"}]}}}',
])
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="lone surrogate"):
        parse_card_bytes(raw, "application/json")
