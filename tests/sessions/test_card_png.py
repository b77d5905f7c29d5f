"""Cards inside PNGs (sessions/card_png.py): reading, writing, and every corrupt input class."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sessions.card_png
from protocol.errors import BadRequest
from sessions.card_png import (
    MAX_CARD_JSON_BYTES,
    MAX_PNG_BYTES,
    PNG_SIGNATURE,
    default_image,
    read_card_png,
    write_card_png,
)

CARDS = Path(__file__).resolve().parents[1] / "fixtures" / "cards"
V2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Two"}}
V3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "Three", "nickname": "3"}}


def b64(card: Any) -> str:
    return base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii")


def pillow_png(**chunks: Any) -> bytes:
    """A real image written by Pillow, with text chunks: str → tEXt, (str, 'z') → zTXt, (str, 'i') → iTXt."""
    info = PngInfo()
    for keyword, value in chunks.items():
        if isinstance(value, tuple):
            text, kind = value
            if kind == "z":
                info.add_text(keyword, text, zip=True)
            else:
                info.add_itxt(keyword, text, zip=kind == "iz")
        else:
            info.add_text(keyword, value)
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def with_chunk_before_iend(png: bytes, extra: bytes) -> bytes:
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + extra + png[iend:]


def bad(data: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        read_card_png(data)
    assert fragment in caught.value.message, caught.value.message


def test_module_is_pure() -> None:
    source = Path(sessions.card_png.__file__).read_text(encoding="utf-8")
    assert "PIL" not in source and "open(" not in source and "await" not in source


# ---------------------------------------------------------------- reading


def test_reads_the_pillow_made_fixture() -> None:
    card = read_card_png((CARDS / "v2_card.png").read_bytes())
    assert card["spec"] == "chara_card_v2"
    assert card["data"]["name"] == "Mira Vale"


def test_prefers_ccv3_whatever_the_order() -> None:
    assert read_card_png(pillow_png(chara=b64(V2), ccv3=b64(V3)))["data"]["name"] == "Three"
    assert read_card_png(pillow_png(ccv3=b64(V3), chara=b64(V2)))["data"]["name"] == "Three"
    assert read_card_png(pillow_png(chara=b64(V2)))["data"]["name"] == "Two"
    assert read_card_png(pillow_png(ccv3=b64(V3)))["data"]["name"] == "Three"


def test_keyword_case_and_compressed_text_chunks() -> None:
    assert read_card_png(pillow_png(Chara=b64(V2)))["data"]["name"] == "Two"
    assert read_card_png(pillow_png(chara=(b64(V2), "z")))["data"]["name"] == "Two"
    assert read_card_png(pillow_png(chara=(b64(V2), "i")))["data"]["name"] == "Two"
    assert read_card_png(pillow_png(ccv3=(b64(V3), "iz")))["data"]["name"] == "Three"


def test_wrapped_base64_and_unicode_text() -> None:
    card = {"spec": "chara_card_v2", "data": {"name": "Zoë 🌙", "description": "日本語"}}
    text = b64(card)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert read_card_png(pillow_png(chara=wrapped)) == card


# ---------------------------------------------------------------- every bad input class


def test_not_a_png() -> None:
    bad(b"", "not a PNG")
    bad(b'{"spec": "chara_card_v2"}', "not a PNG")
    bad(b"GIF89a" + bytes(100), "not a PNG")


def test_oversized_png() -> None:
    bad(PNG_SIGNATURE + bytes(MAX_PNG_BYTES), "larger than")


def test_truncated() -> None:
    png = pillow_png(chara=b64(V2))
    bad(png[:len(png) - 12], "truncated")  # IEND cut off
    bad(png[:40], "truncated")  # inside a chunk
    bad(PNG_SIGNATURE, "truncated")


def test_impossible_chunk_length() -> None:
    png = pillow_png(chara=b64(V2))
    broken = png[:8] + struct.pack(">I", 0xFFFFFFF0) + png[12:]
    bad(broken, "impossible length")


def test_crc_mismatch() -> None:
    png = bytearray(pillow_png(chara=b64(V2)))
    position = png.index(b"chara") + 10  # inside the card text
    png[position] ^= 0x01
    bad(bytes(png), "CRC")


def test_first_chunk_must_be_ihdr() -> None:
    png = pillow_png(chara=b64(V2))
    bad(PNG_SIGNATURE + chunk(b"tEXt", b"chara\0" + b64(V2).encode()) + png[8:], "IHDR")


def test_no_card_chunk() -> None:
    bad(pillow_png(Title="no card here"), "no character card")
    bad((CARDS / "no_card.png").read_bytes(), "no character card")
    bad(default_image(), "no character card")


def test_bad_base64() -> None:
    bad(pillow_png(chara="not base64 at all!"), "not valid base64")
    bad((CARDS / "bad_base64.png").read_bytes(), "not valid base64")
    bad(pillow_png(chara="QUJ"), "not valid base64")  # missing padding


def test_not_utf8_not_json_not_a_map() -> None:
    bad(pillow_png(chara=base64.b64encode(b"\xff\xfe\x00").decode()), "not valid UTF-8")
    bad(pillow_png(chara=base64.b64encode(b"{nope").decode()), "not valid JSON")
    bad(pillow_png(chara=base64.b64encode(b"[1, 2]").decode()), "not an object")
    bad(pillow_png(chara=base64.b64encode(b'{"a": Infinity}').decode()), "Infinity")
    bad(pillow_png(chara=base64.b64encode(b"[" * 50_000).decode()), "nested too deeply")


def test_oversized_card_text() -> None:
    huge = base64.b64encode(b" " * (MAX_CARD_JSON_BYTES + 1)).decode()
    bad(pillow_png(chara=huge), "larger than")


def test_zip_bomb_is_capped() -> None:
    bomb = zlib.compress(b"A" * (8 * MAX_CARD_JSON_BYTES), 9)
    png = with_chunk_before_iend(default_image(), chunk(b"zTXt", b"chara\0\0" + bomb))
    assert len(png) < 100_000
    bad(png, "inflates to more than")


def test_broken_compressed_chunks() -> None:
    base = default_image()
    bad(with_chunk_before_iend(base, chunk(b"zTXt", b"chara\0\0not zlib")), "not valid zlib")
    bad(with_chunk_before_iend(base, chunk(b"zTXt", b"chara\0\x07" + zlib.compress(b"x"))), "compression method")
    bad(with_chunk_before_iend(base, chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"QUJD")[:-3])), "truncated zlib")
    bad(with_chunk_before_iend(base, chunk(b"iTXt", b"chara\0\x01")), "truncated")
    bad(with_chunk_before_iend(base, chunk(b"iTXt", b"chara\0\x02\x00\0\0x")), "compression method")


# ---------------------------------------------------------------- writing


def test_default_image_is_a_valid_png() -> None:
    image = Image.open(io.BytesIO(default_image()))
    image.load()
    assert image.size == (32, 32) and image.mode == "L"
    assert image.getpixel((5, 5)) == 0x80


def test_written_png_reads_back_and_pillow_still_opens_it() -> None:
    written = write_card_png(v2=V2, v3=V3, image=(CARDS / "v2_card.png").read_bytes())
    assert read_card_png(written) == V3
    image = Image.open(io.BytesIO(written))
    image.load()
    assert image.size == (64, 64)
    # Pillow reads our chunks too, and the old card is gone (one chara, the new one).
    assert json.loads(base64.b64decode(image.text["chara"])) == V2
    assert json.loads(base64.b64decode(image.text["ccv3"])) == V3
    assert written.count(b"chara\0") == 1
    assert image.text["Title"] == "Mira Vale"  # other text chunks are kept
    # The pixels are untouched.
    original = Image.open(CARDS / "v2_card.png")
    assert image.tobytes() == original.tobytes()


def test_write_without_image_and_v2_only() -> None:
    written = write_card_png(v2=V2)
    assert read_card_png(written) == V2
    assert Image.open(io.BytesIO(written)).size == (32, 32)
    assert b"ccv3" not in written


def test_rewriting_replaces_compressed_card_chunks_too() -> None:
    old = pillow_png(ccv3=(b64({"spec": "stale"}), "z"), chara=(b64({"spec": "stale"}), "i"))
    written = write_card_png(v2=V2, image=old)
    assert read_card_png(written) == V2  # no stale ccv3 left to be preferred


def test_write_needs_a_card_and_a_valid_image() -> None:
    with pytest.raises(ValueError, match="V2 or a V3"):
        write_card_png(v2=None, v3=None)
    with pytest.raises(BadRequest, match="not a PNG"):
        write_card_png(v2=V2, image=b"GIF89a")


def test_unicode_card_survives_writing() -> None:
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Zoë 🌙", "description": "日本語\n\"q\""}}
    assert read_card_png(write_card_png(v2=card)) == card


# ---------------------------------------------------------------- fuzz


def test_random_mutations_only_ever_raise_bad_request() -> None:
    """Flipped, inserted, deleted bytes and truncations: a card or BadRequest, nothing else."""
    rng = random.Random(20240518)
    seeds = [
        (CARDS / "v2_card.png").read_bytes(),
        write_card_png(v2=V2, v3=V3),
        pillow_png(chara=(b64(V2), "z"), ccv3=(b64(V3), "iz")),
    ]
    outcomes = {"card": 0, "bad": 0}
    for i in range(3_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            action = rng.random()
            if action < 0.5:
                data[position] = rng.randrange(256)
            elif action < 0.7:
                data.insert(position, rng.randrange(256))
            elif action < 0.85:
                del data[position]
            else:
                del data[position:]
                if not data:
                    break
        try:
            result = read_card_png(bytes(data))
        except BadRequest:
            outcomes["bad"] += 1
        else:
            assert isinstance(result, dict), i
            outcomes["card"] += 1
    # Most mutations break a CRC; some land after IEND or are undone, and still read.
    assert outcomes["bad"] > 2_000
    assert outcomes["card"] > 0


def test_mutated_chunk_bodies_with_fixed_crcs_only_raise_bad_request() -> None:
    """Mutations the CRC cannot catch: a rewritten card chunk with a correct CRC."""
    rng = random.Random(7)
    base = default_image()
    text = b64(V3).encode()
    for _ in range(1_000):
        body = bytearray(rng.choice([b"ccv3\0", b"chara\0", b"ccv3\0\0", b"chara\0\x01\x00\0\0"]) + text)
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        kind = rng.choice([b"tEXt", b"zTXt", b"iTXt"])
        try:
            read_card_png(with_chunk_before_iend(base, chunk(kind, bytes(body))))
        except BadRequest:
            pass
