"""Characters over REST on real server processes, and the per-process CharacterCatalog.

Two `rapport serve` processes share one Redis prefix; the card fixtures under
tests/fixtures/cards/ come from an independent writer (Pillow).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, ROOT, SIM_FLAGS, ServerProcess, clean_prefix, make_token

from server.characters import MULTIPART_AVAILABLE
from sessions.card_png import read_card_png, write_card_png
from sessions.keys import KeySpace

CARDS = ROOT / "tests" / "fixtures" / "cards"
FLAGS = [*SIM_FLAGS, "--auth", "jwt"]
#: The catalog's TTL in the server (server.characters.DEFAULT_CATALOG_TTL_S) plus slack for a loaded machine.
CROSS_PROCESS_BOUND_S = 2.0 + 2.0


def fixture(name: str) -> bytes:
    return (CARDS / name).read_bytes()


def bearer(user: str, *roles: str) -> dict[str, str]:
    extra = {"roles": list(roles)} if roles else {}
    # Built when the module is collected: valid for a day, however long the suite runs first.
    return {"Authorization": f"Bearer {make_token(user, ttl=86400, **extra)}"}


OPS = bearer("ops-chars", "operator")
USER = bearer("plain-user")
PNG = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk; an independent reading of the container."""
    out, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        out.append((data[offset + 4: offset + 8], data[offset + 8: offset + 8 + length]))
        offset += 12 + length
    return out


def text_keywords(data: bytes) -> list[str]:
    return [body.partition(b"\0")[0].decode("latin-1") for kind, body in png_chunks(data) if kind == b"tEXt"]


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    value = f"rapport-test-chars:{uuid.uuid4().hex[:10]}:"
    yield value
    clean_prefix(value)


@pytest.fixture(scope="module")
def server_a(prefix: str) -> Iterator[ServerProcess]:
    server = ServerProcess(prefix=prefix, extra=FLAGS, name="rapport-chars-a").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_b(prefix: str, server_a: ServerProcess) -> Iterator[ServerProcess]:
    server = ServerProcess(prefix=prefix, extra=FLAGS, name="rapport-chars-b").start()
    yield server
    server.stop()


@pytest.fixture
async def http(server_a: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server_a.base, timeout=60) as client:
        yield client


async def stored_ids(prefix: str) -> list[str]:
    r: Any = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return sorted(await r.zrange(KeySpace(prefix).character_index(), 0, -1))
    finally:
        await r.aclose()


async def audit_entries(prefix: str) -> list[dict[str, str]]:
    r: Any = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return [f for _, f in await r.xrange(KeySpace(prefix).audit())]
    finally:
        await r.aclose()


async def create(http: httpx.AsyncClient, body: bytes, headers: dict[str, str], cid: str | None = None
                 ) -> httpx.Response:
    return await http.post("/v1/characters", content=body, headers={**OPS, **headers},
                           params={"id": cid} if cid else None)


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- create, read, list


async def test_create_from_png_and_json_then_read(http: httpx.AsyncClient, prefix: str) -> None:
    png_id, json_id = unique("mira"), unique("captain")
    r = await create(http, fixture("v2_card.png"), PNG, png_id)
    assert r.status_code == 201, r.text
    mira = r.json()
    assert mira["id"] == png_id and mira["name"] == "Mira Vale" and mira["spec"] == "chara_card_v2"
    assert mira["has_avatar"] is True and isinstance(mira["updated_at"], int)
    assert mira["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 300}
    assert r.headers["location"] == f"/v1/characters/{png_id}"

    r = await create(http, fixture("v3_card.json"), JSON, json_id)
    assert r.status_code == 201, r.text
    captain = r.json()
    source = json.loads(fixture("v3_card.json"))["data"]
    assert captain["name"] == source["name"] and captain["nickname"] == "Ori"
    assert captain["alternate_greetings"] == source["alternate_greetings"]
    assert captain["greetings"] == 1 + len(source["alternate_greetings"])
    assert captain["character_book"] == source["character_book"]
    assert captain["lora"] == "airship-captain-v1" and captain["sampling"]["max_tokens"] == 512
    assert captain["extensions"]["depth_prompt"] == {"prompt": "", "depth": 4}  # unknown extensions kept
    assert captain["has_avatar"] is False

    r = await http.get(f"/v1/characters/{json_id}", headers=USER)  # any signed-in user reads
    assert r.status_code == 200 and r.json() == captain

    r = await http.get("/v1/characters", headers=USER)
    assert r.status_code == 200
    listing = r.json()
    ids = [c["id"] for c in listing["characters"]]
    assert ids.index(json_id) < ids.index(png_id)  # newest update first
    row = next(c for c in listing["characters"] if c["id"] == json_id)
    assert row["name"] == "Captain Oriel Thane" and row["greetings"] == 4 and "mes_example" not in row
    assert listing["total"] >= 2

    # Without an id the name makes one.
    name = f"Zoë {uuid.uuid4().hex[:6]}"
    card = {"name": name, "description": "a V1 card", "first_mes": "hi"}
    r = await create(http, json.dumps(card).encode(), JSON)
    assert r.status_code == 201 and r.json()["id"] == f"zoe-{name[4:]}" and r.json()["spec"] == "chara_card_v1"


async def test_listing_pages(http: httpx.AsyncClient) -> None:
    for i in range(3):
        r = await create(http, json.dumps({"name": f"Pager {i}"}).encode(), JSON, unique(f"pager{i}"))
        assert r.status_code == 201
    first = (await http.get("/v1/characters", params={"limit": 2}, headers=USER)).json()
    assert len(first["characters"]) == 2 and first["next_offset"] == 2
    second = (await http.get("/v1/characters", params={"limit": 2, "offset": 2}, headers=USER)).json()
    assert not {c["id"] for c in first["characters"]} & {c["id"] for c in second["characters"]}
    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
        r = await http.get("/v1/characters", params=bad, headers=USER)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


# ---------------------------------------------------------------- export and re-import


async def test_export_json_and_png_round_trip(http: httpx.AsyncClient) -> None:
    mira_id, captain_id = unique("mira"), unique("captain")
    assert (await create(http, fixture("v2_card.png"), PNG, mira_id)).status_code == 201
    assert (await create(http, fixture("v3_card.json"), JSON, captain_id)).status_code == 201
    original_idat = [b for t, b in png_chunks(fixture("v2_card.png")) if t == b"IDAT"]

    for cid in (mira_id, captain_id):
        stored = (await http.get(f"/v1/characters/{cid}", headers=USER)).json()
        for spec in ("v2", "v3"):
            r = await http.get(f"/v1/characters/{cid}/card", params={"spec": spec, "format": "json"}, headers=USER)
            assert r.status_code == 200, r.text
            exported = r.json()
            assert exported["spec"] == f"chara_card_{spec}"
            assert exported["data"]["extensions"]["rapport"]["sampling"] == stored["sampling"]
            copy = unique("copy")
            r = await create(http, r.content, JSON, copy)
            assert r.status_code == 201, r.text
            again = r.json()
            same = ("name", "description", "personality", "scenario", "first_mes", "alternate_greetings",
                    "mes_example", "system_prompt", "post_history_instructions", "creator_notes", "tags",
                    "character_book", "extensions", "sampling", "lora")
            assert {k: again[k] for k in same} == {k: stored[k] for k in same}
            if spec == "v3":
                assert again["nickname"] == stored["nickname"]

            r = await http.get(f"/v1/characters/{cid}/card", params={"spec": spec, "format": "png"}, headers=USER)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.headers["content-disposition"].startswith(f'attachment; filename="{cid}.png"')
            png = r.content
            keywords = text_keywords(png)
            assert keywords.count("chara") == 1  # the stale card of the upload is gone
            assert keywords.count("ccv3") == (1 if spec == "v3" else 0)
            if cid == mira_id:
                # The operator's own picture comes back, not a placeholder.
                assert [b for t, b in png_chunks(png) if t == b"IDAT"] == original_idat
            assert read_card_png(png)["spec"] == f"chara_card_{spec}"
            copy = unique("pngcopy")
            r = await create(http, png, PNG, copy)
            assert r.status_code == 201, r.text
            assert {k: r.json()[k] for k in same} == {k: stored[k] for k in same}
            assert r.json()["has_avatar"] is True

    r = await http.get(f"/v1/characters/{captain_id}/card", params={"spec": "v4"}, headers=USER)
    assert r.status_code == 400 and "spec" in r.json()["error"]["message"]
    r = await http.get(f"/v1/characters/{captain_id}/card", params={"format": "gif"}, headers=USER)
    assert r.status_code == 400
    r = await http.get(f"/v1/characters/{unique('nobody')}/card", headers=USER)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.skipif(not MULTIPART_AVAILABLE, reason="python-multipart is not installed")
async def test_multipart_upload(http: httpx.AsyncClient) -> None:
    cid = unique("multi")
    r = await http.post("/v1/characters", params={"id": cid}, headers=OPS,
                        files={"file": ("mira.png", fixture("v2_card.png"), "image/png")})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "Mira Vale" and r.json()["has_avatar"] is True
    r = await http.post("/v1/characters", params={"id": unique("multi")}, headers=OPS,
                        files={"other": ("mira.png", fixture("v2_card.png"), "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]["message"]


# ---------------------------------------------------------------- update and delete


async def test_update_and_delete(http: httpx.AsyncClient, prefix: str) -> None:
    cid = unique("edit")
    assert (await create(http, fixture("v2_card.png"), PNG, cid)).status_code == 201
    card = json.loads(fixture("v3_card.json"))
    card["data"]["name"] = "Renamed"
    r = await http.put(f"/v1/characters/{cid}", content=json.dumps(card), headers={**OPS, **JSON})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Renamed" and r.json()["id"] == cid
    assert r.json()["has_avatar"] is True  # a JSON update keeps the uploaded picture
    assert (await http.get(f"/v1/characters/{cid}", headers=USER)).json()["name"] == "Renamed"
    listing = (await http.get("/v1/characters", headers=USER)).json()["characters"]
    assert listing[0]["id"] == cid  # the update made it the newest

    # PUT of an unknown id creates it (201); POST of a taken id is 409 and changes nothing.
    fresh = unique("put-new")
    r = await http.put(f"/v1/characters/{fresh}", content=fixture("v3_card.json"), headers={**OPS, **JSON})
    assert r.status_code == 201 and r.json()["id"] == fresh
    r = await create(http, json.dumps({"name": "Impostor"}).encode(), JSON, cid)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert (await http.get(f"/v1/characters/{cid}", headers=USER)).json()["name"] == "Renamed"

    r = await http.delete(f"/v1/characters/{cid}", headers=OPS)
    assert r.status_code == 200 and r.json() == {"id": cid, "deleted": True}
    assert (await http.get(f"/v1/characters/{cid}", headers=USER)).status_code == 404
    assert (await http.get(f"/v1/characters/{cid}/card", headers=USER)).status_code == 404
    assert (await http.delete(f"/v1/characters/{cid}", headers=OPS)).status_code == 404
    assert cid not in await stored_ids(prefix)

    entries = [e for e in await audit_entries(prefix) if e.get("target") == cid]
    assert [(e["action"], e["status"]) for e in entries] == [
        ("character.create", "ok"), ("character.update", "ok"), ("character.create", "conflict"),
        ("character.delete", "ok"), ("character.delete", "not_found")]
    assert all(e["kind"] == "admin_action" and e["actor"] == "ops-chars" and e["role"] == "operator"
               for e in entries)


# ---------------------------------------------------------------- roles


async def test_roles(http: httpx.AsyncClient, prefix: str) -> None:
    cid = unique("guarded")
    writes = [("POST", "/v1/characters", {"id": cid}), ("PUT", f"/v1/characters/{cid}", None),
              ("DELETE", f"/v1/characters/{cid}", None)]
    reads = ["/v1/characters", f"/v1/characters/{cid}", f"/v1/characters/{cid}/card"]
    for method, path, params in writes:
        r = await http.request(method, path, params=params, content=fixture("v3_card.json"), headers=JSON)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await http.request(method, path, params=params, content=fixture("v3_card.json"),
                               headers={**JSON, "Authorization": "Bearer not-a-jwt"})
        assert r.status_code == 401
        r = await http.request(method, path, params=params, content=fixture("v3_card.json"),
                               headers={**USER, **JSON})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden" and "operator" in r.json()["error"]["message"]
    for path in reads:
        assert (await http.get(path)).status_code == 401
    assert cid not in await stored_ids(prefix)
    refused = [e for e in await audit_entries(prefix) if e.get("target") == cid]
    assert {(e["action"], e["status"]) for e in refused} == {
        ("character.create", "forbidden"), ("character.update", "forbidden"), ("character.delete", "forbidden")}

    # admin includes operator.
    r = await create(http, fixture("v3_card.json"), {**JSON, **bearer("root", "admin")}, cid)
    assert r.status_code == 201
    assert (await http.get(f"/v1/characters/{cid}", headers=USER)).status_code == 200


# ---------------------------------------------------------------- bad input


BAD_CARDS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("unknown spec", fixture("bad_spec.json"), JSON, "unsupported card spec"),
    ("png without a card", fixture("no_card.png"), PNG, "no character card"),
    ("png with bad base64", fixture("bad_base64.png"), PNG, "base64"),
    ("not json", b"{this is not json", JSON, "not valid JSON"),
    ("json not an object", b"[1, 2, 3]", JSON, "must be a JSON object"),
    ("not utf-8", b'{"name": "\xff"}', JSON, "UTF-8"),
    ("no name", json.dumps({"spec": "chara_card_v2", "data": {"description": "x"}}).encode(), JSON, "name"),
    ("v2 without data", json.dumps({"spec": "chara_card_v2", "spec_version": "2.0"}).encode(), JSON, "'data'"),
    ("labelled png but json", b'{"name": "x"}', PNG, "not a PNG"),
    ("truncated png", fixture("v2_card.png")[:300], PNG, "truncated"),
    ("empty body", b"", JSON, "empty"),
    ("bad rapport settings",
     json.dumps({"spec": "chara_card_v2", "data": {"name": "x", "extensions": {
         "rapport": {"sampling": {"temperature": 9}}}}}).encode(), JSON, "temperature"),
    ("field too long", json.dumps({"name": "x", "description": "y" * 70_000}).encode(), JSON, "description"),
]


@pytest.mark.parametrize(("body", "headers", "expected"), [c[1:] for c in BAD_CARDS], ids=[c[0] for c in BAD_CARDS])
async def test_bad_cards_are_400_and_store_nothing(http: httpx.AsyncClient, prefix: str, body: bytes,
                                                   headers: dict[str, str], expected: str) -> None:
    before = await stored_ids(prefix)
    cid = unique("bad")
    for method, path, params in (("POST", "/v1/characters", {"id": cid}), ("PUT", f"/v1/characters/{cid}", None)):
        r = await http.request(method, path, params=params, content=body, headers={**OPS, **headers})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_request" and expected in r.json()["error"]["message"], r.text
    assert await stored_ids(prefix) == before


async def test_bad_ids_are_400(http: httpx.AsyncClient, prefix: str) -> None:
    before = await stored_ids(prefix)
    for cid in ("has space", "x" * 129, "slash%2Fin", "ünïcode"):
        r = await create(http, fixture("v3_card.json"), JSON, cid)
        assert r.status_code == 400 and "character id" in r.json()["error"]["message"], (cid, r.text)
    r = await http.get("/v1/characters/bad%20id", headers=USER)
    assert r.status_code == 400
    assert await stored_ids(prefix) == before


async def test_oversized_bodies_are_413(http: httpx.AsyncClient, prefix: str) -> None:
    before = await stored_ids(prefix)
    big_json = json.dumps({"name": "Big", "description": "x" * (1024 * 1024)}).encode()
    big_png = write_card_png(v2={"spec": "chara_card_v2", "data": {"name": "Big"}})
    big_png = big_png[:-12] + _filler_chunk(8 * 1024 * 1024) + big_png[-12:]  # before IEND
    cases = [(big_json, JSON), (big_png, PNG), (big_json, {"Content-Type": "application/octet-stream"})]
    for body, headers in cases:
        r = await create(http, body, headers, unique("big"))
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "too_large"
    # Without a Content-Length (chunked), the bound holds while the body is read.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    r = await http.post("/v1/characters", content=chunks(), headers={**OPS, **JSON})
    assert r.status_code == 413
    assert await stored_ids(prefix) == before


def _filler_chunk(size: int) -> bytes:
    import zlib

    body = b"\0" * size
    return struct.pack(">I", size) + b"zzZz" + body + struct.pack(">I", zlib.crc32(b"zzZz" + body))


# ---------------------------------------------------------------- two processes


async def test_two_processes_see_each_others_writes(server_a: ServerProcess, server_b: ServerProcess) -> None:
    cid = unique("shared")
    async with httpx.AsyncClient(base_url=server_a.base, timeout=30) as a, \
            httpx.AsyncClient(base_url=server_b.base, timeout=30) as b:
        # B looks first, so its catalog remembers "no such character".
        assert (await b.get(f"/v1/characters/{cid}", headers=USER)).status_code == 404
        r = await a.post("/v1/characters", params={"id": cid}, content=fixture("v3_card.json"),
                         headers={**OPS, **JSON})
        assert r.status_code == 201
        assert (await a.get(f"/v1/characters/{cid}", headers=USER)).status_code == 200  # at once where written
        await _until(b, cid, lambda r: r.status_code == 200)

        card = json.loads(fixture("v3_card.json"))
        card["data"]["name"] = "Edited on B"
        assert (await b.put(f"/v1/characters/{cid}", content=json.dumps(card),
                            headers={**OPS, **JSON})).status_code == 200
        assert (await b.get(f"/v1/characters/{cid}", headers=USER)).json()["name"] == "Edited on B"
        await _until(a, cid, lambda r: r.status_code == 200 and r.json()["name"] == "Edited on B")

        assert (await a.delete(f"/v1/characters/{cid}", headers=OPS)).status_code == 200
        await _until(b, cid, lambda r: r.status_code == 404)


async def _until(client: httpx.AsyncClient, cid: str, ok: Any) -> None:
    deadline = time.monotonic() + CROSS_PROCESS_BOUND_S
    while True:
        r = await client.get(f"/v1/characters/{cid}", headers=USER)
        if ok(r):
            return
        assert time.monotonic() < deadline, f"not visible within {CROSS_PROCESS_BOUND_S}s: {r.status_code} {r.text}"
        await asyncio.sleep(0.1)


def test_fixtures_exist() -> None:
    for name in ("v2_card.png", "v3_card.json", "bad_spec.json", "no_card.png", "bad_base64.png"):
        assert Path(CARDS / name).is_file(), name
