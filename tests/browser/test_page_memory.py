"""The chat page's "/remember" and "/memory" (docs/protocol.md addition 22) in a real Chromium
against a real server: the command pins a fact instead of sending a message."""

from __future__ import annotations

import pytest
import test_chat_page
from conftest import ServerProcess
from test_chat_page import bubbles, connect_page, new_user, open_page, say
from wire import open_ws, recv_until, send

from protocol import client_frames

pytestmark = pytest.mark.timeout(240)

#: The chat page tests' module-scoped Chromium, used here by name.
browser = test_chat_page.browser

NOTICE = "#notice:not([hidden])"
#: What the page sends on its own (handshake, history, heartbeats).
ROUTINE = ("hello", "pong", "ping", "history.get")


async def stored_facts(server: ServerProcess, user: str) -> list[str]:
    ws = await open_ws(server, user=user)
    try:
        await send(ws, client_frames.memory_list())
        return [f["text"] for f in (await recv_until(ws, "memory"))[-1]["facts"]]
    finally:
        await ws.close()


async def test_remember_pins_a_fact_and_memory_lists_them(browser, sim_server):
    user = new_user("memory")
    async with open_page(browser) as w:
        await connect_page(w, sim_server.base, user)
        await say(w, "/remember I take my tea green")
        await w.page.wait_for_selector(NOTICE + ":has-text('Remembered')")
        assert await w.page.input_value("#input") == ""
        assert await bubbles(w) == []  # no message was sent
        assert [f["type"] for f in w.sent if f["type"] not in ROUTINE] == ["memory.add"]
        assert next(f for f in w.sent if f["type"] == "memory.add")["text"] == "I take my tea green"
        assert await stored_facts(sim_server, user) == ["I take my tea green"]

        await say(w, "/memory")
        await w.page.wait_for_selector(NOTICE + ":has-text('I take my tea green')")
        assert [f["type"] for f in w.sent if f["type"] not in ROUTINE] == ["memory.add", "memory.list"]

        # A refused fact stays in the box and the error is shown.
        too_long = "/remember " + "x" * 600
        await say(w, too_long)
        await w.page.wait_for_selector(NOTICE + ":has-text('longer than')")
        assert await w.page.input_value("#input") == too_long
        assert await bubbles(w) == []
        w.assert_clean()
