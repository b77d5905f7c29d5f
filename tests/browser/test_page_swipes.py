"""The chat page's additions in a real Chromium against a real server (docs/protocol.md, 18-21).

The server runs as a developer would start it: on loopback with no JWT secret,
so it signs with the development secret and prints the signed-in link. The
tests open that link, pick a character an operator created over REST, swipe
between regenerated replies, rate one, and cut the socket in the middle of a
regenerated reply. Helpers and the ``browser`` fixture come from the chat
page's own browser tests.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import test_chat_page
from conftest import ServerProcess, clean_prefix, make_token
from test_chat_page import REPLY_MS, STEP_MS, PageWatch, SocketCutter, new_user, open_page, say
from wire import open_ws, recv_until, send

from protocol.development import DEV_JWT_SECRET
from server.dev_link import ANNOUNCEMENT

pytestmark = pytest.mark.timeout(240)

#: The chat page tests' module-scoped Chromium, used here by name.
browser = test_chat_page.browser

LINK = re.compile(re.escape(ANNOUNCEMENT) + r"(http://127\.0\.0\.1:\d+/#token=[A-Za-z0-9_.-]+)")

# The reply the page shows for the newest exchange, and the controls under it.
SHOWN_REPLY = "#messages .msg.assistant[data-turn-id]:not([hidden])"
SHOWN_COUNT = SHOWN_REPLY + " .swipe-count"


@pytest.fixture(scope="module")
def dev_server(redis_url: str) -> Iterator[ServerProcess]:
    """A loopback server with the development secret (no --jwt-secret); replies last a few seconds."""
    prefix = f"rapport-test-swipes:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, jwt_secret=None, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "40", "--sim-itl-ms", "40",
        "--sim-reply-tokens", "100", "--heartbeat-interval-ms", "1000",
        "--heartbeat-timeout-ms", "3000"]).start()
    try:
        yield server
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)


def dev_token(user: str, **claims: Any) -> str:
    return make_token(user, secret=DEV_JWT_SECRET, ttl=3600, **claims)


def printed_link(server: ServerProcess) -> str:
    deadline = time.monotonic() + 15
    while True:
        found = LINK.search(server.log(None))
        if found:
            return found.group(1)
        assert time.monotonic() < deadline, f"no sign-in link in the server's output:\n{server.log()}"
        time.sleep(0.1)


async def open_signed_in(w: PageWatch, base: str, token: str) -> None:
    await w.page.goto(f"{base}/#token={token}")
    await w.page.wait_for_selector('#status[data-state="connected"]')


async def shown_reply(w: PageWatch) -> dict[str, str]:
    return await w.page.eval_on_selector_all(
        SHOWN_REPLY,
        "all => { const e = all[all.length - 1]; return {turn_id: e.dataset.turnId,"
        " text: e.querySelector('.bubble').textContent,"
        " status: e.dataset.status, exchange_id: e.dataset.exchangeId || '',"
        " count: (e.querySelector('.swipe-count') || {}).textContent || '',"
        " repaired: e.dataset.repaired || '', rating: e.dataset.rating || ''}; }")


async def wait_shown_ended(w: PageWatch, *, not_turn: str = "") -> dict[str, str]:
    """Until the newest shown reply (other than ``not_turn``) has ended; then it."""
    await w.page.wait_for_function(
        """([sel, notTurn]) => {
             const all = document.querySelectorAll(sel);
             const m = all[all.length - 1];
             return m && m.dataset.turnId !== notTurn && m.dataset.status !== 'waiting'
                    && m.dataset.status !== 'streaming';
           }""", arg=[SHOWN_REPLY, not_turn], timeout=REPLY_MS)
    return await shown_reply(w)


async def wait_count(w: PageWatch, text: str) -> None:
    await w.page.wait_for_function(
        "([sel, t]) => { const c = document.querySelectorAll(sel);"
        " return c.length > 0 && c[c.length - 1].textContent === t; }",
        arg=[SHOWN_COUNT, text], timeout=STEP_MS)


async def history(server: ServerProcess, token: str, conversation_id: str) -> dict[str, Any]:
    ws = await open_ws(server, token=token)
    try:
        await send(ws, {"type": "history.get", "conversation_id": conversation_id, "limit": 100})
        return (await recv_until(ws, "history"))[-1]
    finally:
        await ws.close()


def create_character(server: ServerProcess, name: str) -> str:
    character_id = f"{name.lower()}-{uuid.uuid4().hex[:8]}"
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": name, "description": f"{name} keeps a lighthouse and loves storms.",
        "personality": "warm, curious", "scenario": "A windy evening at the lighthouse.",
        "first_mes": "Welcome in, {{user}}! I'm {{char}}; the kettle is on.",
        "mes_example": "", "creator_notes": "", "system_prompt": "", "post_history_instructions": "",
        "alternate_greetings": [], "tags": ["test"], "creator": "tests", "character_version": "1",
        "extensions": {}}}
    r = httpx.post(f"{server.base}/v1/characters", params={"id": character_id}, json=card, timeout=10,
                   headers={"Authorization": f"Bearer {dev_token('ops-' + uuid.uuid4().hex[:6], roles=['operator'])}"})
    assert r.status_code == 201, r.text
    return character_id


# ---------------------------------------------------------------- sign-in link


async def test_the_printed_link_signs_the_page_in(browser, dev_server):
    link = printed_link(dev_server)
    async with open_page(browser) as w:
        await w.page.goto(link)
        await w.page.wait_for_selector('#status[data-state="connected"]')
        # The token left the address bar (and so the history), and stays on the device.
        assert "#" not in w.page.url and "token" not in w.page.url
        token = link.split("#token=", 1)[1]
        assert await w.page.evaluate("() => localStorage.getItem('rapport.token')") == token
        hello = next(f for f in w.sent if f["type"] == "hello")
        assert hello["token"] == token and "user" not in hello
        ready = next(f for _, f in w.received if f.get("type") == "ready")
        assert ready["user_id"] == "dev"
        # A reload signs in again from storage.
        await w.page.reload()
        await w.page.wait_for_selector('#status[data-state="connected"]')
        assert [f["token"] for f in w.sent if f["type"] == "hello"] == [token, token]
        w.assert_clean()


# ---------------------------------------------------------------- characters, swipes, ratings


async def test_character_greeting_swipes_and_rating(browser, dev_server):
    character_id = create_character(dev_server, "Mira")
    token = dev_token(new_user("swipe"), name="Sam")
    async with open_page(browser, viewport={"width": 390, "height": 844}, is_mobile=True,
                         has_touch=True) as w:
        await open_signed_in(w, dev_server.base, token)
        # The picker lists the character (GET /v1/characters with the page's token).
        await w.page.click("#menu-button")
        await w.page.click("#new-chat")
        await w.page.wait_for_selector('#picker[data-loaded="true"]')
        option = w.page.locator(f'button.character[data-character-id="{character_id}"]')
        assert "Mira" in (await option.text_content() or "")
        await option.click()
        assert await option.get_attribute("aria-pressed") == "true"
        await w.page.click("#picker-start")
        await w.page.wait_for_selector("#picker", state="hidden")
        # The greeting (macros applied) is the first message; the header names the character.
        greeting = w.page.locator('#messages .msg.assistant[data-status="greeting"]')
        await greeting.wait_for()
        assert await greeting.locator(".bubble").text_content() == "Welcome in, Sam! I'm Mira; the kettle is on."
        assert await w.page.text_content("#title") == "Mira"
        conversation = await w.page.evaluate("() => localStorage.getItem('rapport.conversation')")
        assert conversation and conversation != "default"

        # A message, its reply, then another reply to the same message.
        await say(w, "Tell me about the storm last night.")
        first = await wait_shown_ended(w)
        start = next(f for f in w.sent if f["type"] == "turn.start")
        assert start["conversation_id"] == conversation
        assert first["status"] == "stop" and first["count"] == ""  # one reply: no swipe counter yet
        await w.page.click(SHOWN_REPLY + " button.regenerate")
        second = await wait_shown_ended(w, not_turn=first["turn_id"])
        await wait_count(w, "2/2")
        regen = next(f for f in w.sent if f["type"] == "turn.regenerate")
        assert regen["conversation_id"] == conversation and regen["turn_id"] == first["exchange_id"]
        accepted = next(f for _, f in w.received
                        if f.get("type") == "turn.accepted" and f.get("turn_id") == second["turn_id"])
        assert accepted["exchange_id"] == first["exchange_id"] and accepted["alternative"] == 1
        # Only one reply of the exchange is visible at a time.
        assert await w.page.locator("#messages .msg.assistant[data-turn-id]:not([hidden])").count() == 1

        # < goes back to the first reply and tells the server (turn.select -> turn.selected).
        await w.page.click(SHOWN_REPLY + " button.swipe-prev")
        await wait_count(w, "1/2")
        back = await shown_reply(w)
        assert back["turn_id"] == first["turn_id"] and back["text"] == first["text"]
        assert {"type": "turn.select", "conversation_id": conversation, "turn_id": first["turn_id"]} in w.sent
        await w.page.wait_for_function(
            "() => !document.querySelector('[data-select-pending]')", timeout=STEP_MS)
        selected = next(f for _, f in w.received if f.get("type") == "turn.selected")
        assert selected["turn_id"] == first["turn_id"] and selected["exchange_id"] == first["exchange_id"]

        # A reload shows the same selection, from the history.
        await w.page.reload()
        await w.page.wait_for_selector('#status[data-state="connected"]')
        await wait_count(w, "1/2")
        again = await shown_reply(w)
        assert again["turn_id"] == first["turn_id"] and again["text"] == first["text"]
        assert await w.page.text_content("#title") == "Mira"
        stored = await history(dev_server, token, conversation)
        assert stored["character_id"] == character_id
        replies = [m for m in stored["messages"] if m["role"] == "assistant" and m["turn_id"]]
        assert [(m["turn_id"], m["alternative"], m["alternatives"], m["selected"]) for m in replies] == [
            (first["turn_id"], 0, 2, True), (second["turn_id"], 1, 2, False)]
        assert [m["text"] for m in replies] == [first["text"], second["text"]]

        # > moves to the second reply again; > past the last one asks for a third.
        await w.page.click(SHOWN_REPLY + " button.swipe-next")
        await wait_count(w, "2/2")
        assert (await shown_reply(w))["turn_id"] == second["turn_id"]

        # Thumbs up: highlighted once the server recorded it.
        up = w.page.locator(SHOWN_REPLY + " button.rate-up")
        await up.click()
        await w.page.wait_for_selector(f'{SHOWN_REPLY}[data-rating="1"] button.rate-up[aria-pressed="true"]')
        assert {"type": "feedback", "turn_id": second["turn_id"], "rating": 1} in w.sent
        recorded = next(f for _, f in w.received if f.get("type") == "feedback.recorded")
        assert recorded == {"type": "feedback.recorded", "turn_id": second["turn_id"], "rating": 1}
        assert await w.page.get_attribute(SHOWN_REPLY + " button.rate-down", "aria-pressed") == "false"
        # Changing one's mind replaces the rating.
        await w.page.click(SHOWN_REPLY + " button.rate-down")
        await w.page.wait_for_selector(f'{SHOWN_REPLY}[data-rating="-1"] button.rate-down[aria-pressed="true"]')

        # The controls fit a phone: nothing sideways, buttons big enough to tap, all labelled.
        assert await w.page.evaluate("() => document.documentElement.scrollWidth") <= 390
        for button in await w.page.locator(SHOWN_REPLY + " .actions button").all():
            box = await button.bounding_box()
            assert box is not None and box["height"] >= 40 and box["width"] >= 40
            assert await button.get_attribute("aria-label")

        # A plain conversation next to it, then back to the character's from the picker's list.
        await w.page.click("#menu-button")
        await w.page.click("#new-chat")
        await w.page.wait_for_selector('#picker[data-loaded="true"]')
        await w.page.click('button.character[data-character-id=""]')
        await w.page.click("#picker-start")
        await w.page.wait_for_selector("#empty:not([hidden])")
        assert await w.page.text_content("#title") == "Rapport"
        plain = await w.page.evaluate("() => localStorage.getItem('rapport.conversation')")
        assert plain not in (conversation, "default")
        await say(w, "Just us here.")
        await wait_shown_ended(w)
        assert next(f for f in reversed(w.sent) if f["type"] == "turn.start")["conversation_id"] == plain
        await w.page.click("#menu-button")
        await w.page.click("#new-chat")
        await w.page.wait_for_selector('#picker[data-loaded="true"]')
        earlier = w.page.locator(f'button.character[data-conversation-id="{conversation}"]')
        assert "Mira" in (await earlier.text_content() or "")
        await earlier.click()
        await wait_count(w, "2/2")
        assert (await shown_reply(w))["turn_id"] == second["turn_id"]
        assert await w.page.text_content("#title") == "Mira"
        assert await greeting.locator(".bubble").text_content() == "Welcome in, Sam! I'm Mira; the kettle is on."
        w.assert_clean()


async def test_edit_replaces_the_last_message(browser, dev_server):
    token = dev_token(new_user("edit"))
    async with open_page(browser) as w:
        await open_signed_in(w, dev_server.base, token)
        await say(w, "Waht is the lighthouse for?")
        first = await wait_shown_ended(w)
        await w.page.click("#messages .msg.user button.edit")
        assert await w.page.input_value("#input") == "Waht is the lighthouse for?"
        await w.page.fill("#input", "What is the lighthouse for?")
        await w.page.click("#send")
        second = await wait_shown_ended(w, not_turn=first["turn_id"])
        edit = next(f for f in w.sent if f["type"] == "turn.edit")
        assert edit["turn_id"] == first["exchange_id"] and edit["text"] == "What is the lighthouse for?"
        users = await w.page.eval_on_selector_all("#messages .msg.user .bubble", "els => els.map(e => e.textContent)")
        assert users == ["What is the lighthouse for?"]
        assert await w.page.locator("#messages .msg.assistant[data-turn-id]").count() == 1
        stored = await history(dev_server, token, "default")
        assert [(m["role"], m["text"]) for m in stored["messages"]] == [
            ("user", "What is the lighthouse for?"), ("assistant", second["text"])]
        w.assert_clean()


# ---------------------------------------------------------------- a cut socket during a regenerated reply


async def test_cut_socket_during_a_regenerated_reply_yields_one_reply(browser, dev_server):
    token = dev_token(new_user("regen-cut"))
    proxy = await SocketCutter(dev_server.port).start()
    try:
        async with open_page(browser) as w:
            await open_signed_in(w, proxy.base, token)
            await say(w, "Tell me a story about the sea.")
            first = await wait_shown_ended(w)
            await w.page.click(SHOWN_REPLY + " button.regenerate")
            # Cut once the regenerated reply is half-way.
            await w.page.wait_for_function(
                """([sel, first]) => { const all = document.querySelectorAll(sel); const m = all[all.length - 1];
                     return m && m.dataset.turnId !== first && Number(m.dataset.seq || 0) >= 15; }""",
                arg=[SHOWN_REPLY, first["turn_id"]], timeout=REPLY_MS)
            turn_id = (await shown_reply(w))["turn_id"]
            assert proxy.cut(refuse_for=0.4) >= 1
            await w.page.wait_for_function(
                "() => Number(document.getElementById('status').dataset.connects) >= 2", timeout=STEP_MS)
            second = await wait_shown_ended(w, not_turn=first["turn_id"])
            assert second["turn_id"] == turn_id and second["status"] == "stop"
            await wait_count(w, "2/2")

            stored = await history(dev_server, token, "default")
            replies = [m for m in stored["messages"] if m["role"] == "assistant"]
            assert [m["turn_id"] for m in replies] == [first["turn_id"], turn_id]
            assert second["text"] == replies[1]["text"] and not second["repaired"]
            # Exactly one regenerate sent, one resume for exactly what was missing, no gaps or repeats.
            assert len([f for f in w.sent if f["type"] == "turn.regenerate"]) == 1
            resumes = [f for f in w.sent if f["type"] == "turn.resume" and f["turn_id"] == turn_id]
            assert len(resumes) == 1, resumes
            seqs = [f["seq"] for _, f in w.received if f.get("type") == "turn.delta" and f.get("turn_id") == turn_id]
            end = next(f for _, f in w.received if f.get("type") == "turn.end" and f.get("turn_id") == turn_id)
            assert seqs == list(range(1, end["seq"] + 1)), seqs
            assert "".join(f["text"] for _, f in w.received
                           if f.get("type") == "turn.delta" and f.get("turn_id") == turn_id) == second["text"]
            # One bubble per reply: the two alternatives, one of them shown.
            assert await w.page.locator("#messages .msg.assistant[data-turn-id]").count() == 2
            assert await w.page.locator("#messages .msg.user").count() == 1
            w.assert_clean(allow=("WebSocket connection",))
    finally:
        await proxy.close()


# ---------------------------------------------------------------- content filter label


async def test_a_filtered_reply_is_labelled(browser, dev_server):
    """The server's moderation policy is not what is tested here, the label is: the turn.end
    a server with a block list sends is simulated by rewriting finish_reason in flight."""
    token = dev_token(new_user("filtered"))

    def route(page_ws: Any) -> None:
        server_ws = page_ws.connect_to_server()

        def from_server(message: Any) -> None:
            frame = json.loads(message)
            if frame.get("type") == "turn.end":
                frame["finish_reason"] = "content_filter"
                message = json.dumps(frame)
            page_ws.send(message)

        server_ws.on_message(from_server)

    async with open_page(browser) as w:
        await w.page.route_web_socket("**/v1/ws", route)
        await open_signed_in(w, dev_server.base, token)
        await say(w, "Hello there.")
        reply = await wait_shown_ended(w)
        assert reply["status"] == "content_filter"
        marker = w.page.locator(SHOWN_REPLY + ' .marker[data-kind="content_filter"]')
        assert await marker.text_content() == "Filtered"
        assert "content filter" in (await marker.get_attribute("title") or "")
        w.assert_clean()
