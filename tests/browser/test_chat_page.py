"""The chat page at ``GET /`` in a real headless Chromium against real servers.

Playwright's Python package drives an installed Chromium (Debian's ``chromium``;
``scripts/install-browser.sh VENV`` installs both). Without either, the browser
tests skip with the reason; the plain HTTP checks still run.

The reconnect test puts a TCP proxy (:class:`SocketCutter`) between the browser
and the server and cuts every connection it carries in the middle of a reply;
the page derives its WebSocket URL from its own location, so its socket goes
through the proxy too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import ROOT, ServerProcess, clean_prefix, make_token
from wire import open_ws, recv_until, send

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # the HTTP checks below still run
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(240)

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOT = ROOT / "docs" / "chat-page-phone.png"
# Generous: a 2-core machine running other work.
STEP_MS = 30_000
REPLY_MS = 90_000


# ---------------------------------------------------------------- browser


def find_chromium() -> str | None:
    for candidate in (os.environ.get("RAPPORT_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                      shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        pytest.skip("Playwright is not installed (scripts/install-browser.sh .venv installs it)")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found (set RAPPORT_CHROMIUM, or run scripts/install-browser.sh .venv "
                    "as root on Debian/Ubuntu)")
    pw = await async_playwright().start()
    try:
        # launch() gives every browser a fresh temporary profile (user-data-dir).
        b = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True,
                                     timeout=120_000)
        try:
            yield b
        finally:
            await b.close()
    finally:
        await pw.stop()


class PageWatch:
    """A page plus what it logged and what went over its WebSockets."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.received: list[tuple[int, dict[str, Any]]] = []  # (socket number, frame)
        self.sockets = 0
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("websocket", self._socket)

    def _socket(self, ws: Any) -> None:
        self.sockets += 1
        number = self.sockets
        ws.on("framesent", lambda payload: self.sent.append(_json(payload)))
        ws.on("framereceived", lambda payload: self.received.append((number, _json(payload))))

    def assert_clean(self, allow: tuple[str, ...] = ()) -> None:
        bad = [e for e in self.errors if not any(a in e for a in allow)]
        assert not bad, f"the page logged errors: {bad}"


def _json(payload: Any) -> dict[str, Any]:
    try:
        frame = json.loads(payload)
    except (TypeError, ValueError):
        return {"type": "?"}
    return frame if isinstance(frame, dict) else {"type": "?"}


@contextlib.asynccontextmanager
async def open_page(browser: Browser, **context_options: Any) -> AsyncIterator[PageWatch]:
    context = await browser.new_context(**context_options)
    context.set_default_timeout(STEP_MS)
    try:
        page = await context.new_page()
        yield PageWatch(page)
    finally:
        await context.close()


# In-page recorder: every text an assistant bubble showed, and every connection state.
RECORDER = """() => {
  const rec = { texts: {}, states: [], };
  window.__rec = rec;
  const msgs = document.getElementById('messages');
  const status = document.getElementById('status');
  const snap = () => {
    for (const m of msgs.querySelectorAll('.msg.assistant[data-turn-id]')) {
      const id = m.dataset.turnId, text = m.querySelector('.bubble').textContent;
      const list = rec.texts[id] || (rec.texts[id] = []);
      if (list[list.length - 1] !== text) list.push(text);
    }
  };
  new MutationObserver(snap).observe(msgs, { subtree: true, childList: true, characterData: true,
                                             attributes: true });
  const state = () => {
    const s = status.dataset.state;
    if (rec.states[rec.states.length - 1] !== s) rec.states.push(s);
  };
  new MutationObserver(state).observe(status, { attributes: true });
  state();
}"""


async def connect_page(w: PageWatch, base: str, user: str) -> None:
    await w.page.goto(f"{base}/#user={user}")
    await w.page.wait_for_selector('#status[data-state="connected"]')
    await w.page.evaluate(RECORDER)


async def say(w: PageWatch, text: str) -> None:
    await w.page.fill("#input", text)
    await w.page.click("#send")


async def wait_for_seq(w: PageWatch, at_least: int) -> None:
    await w.page.wait_for_function(
        "n => { const m = document.querySelector('.msg.assistant[data-seq]');"
        " return m && Number(m.dataset.seq) >= n; }", arg=at_least, timeout=REPLY_MS)


async def wait_ended(w: PageWatch, count: int = 1) -> None:
    """Until ``count`` assistant bubbles show an ended reply."""
    await w.page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant[data-turn-id]:not([data-status=\"waiting\"])"
        ":not([data-status=\"streaming\"])').length >= n", arg=count, timeout=REPLY_MS)


async def bubbles(w: PageWatch) -> list[dict[str, str]]:
    return await w.page.eval_on_selector_all(
        "#messages .msg",
        "els => els.map(e => ({role: e.classList.contains('user') ? 'user' : 'assistant',"
        " text: e.querySelector('.bubble').textContent, status: e.dataset.status || '',"
        " turn_id: e.dataset.turnId || '', repaired: e.dataset.repaired || '',"
        " marker: (e.querySelector('.marker') || {}).textContent || ''}))")


async def history_of(server: ServerProcess, *, user: str | None = None, token: str | None = None) -> list[dict]:
    """The stored conversation, read over a separate WebSocket straight to the server."""
    ws = await open_ws(server, user=user, token=token)
    try:
        await send(ws, {"type": "history.get", "conversation_id": "default", "limit": 100})
        frames = await recv_until(ws, "history")
        return frames[-1]["messages"]
    finally:
        await ws.close()


async def stored_reply(server: ServerProcess, user: str, turn_id: str) -> dict:
    """The assistant message of ``turn_id`` once it is stored."""
    deadline = time.monotonic() + 30
    while True:
        for m in await history_of(server, user=user):
            if m["role"] == "assistant" and m["turn_id"] == turn_id:
                return m
        assert time.monotonic() < deadline, f"no stored reply for {turn_id}"
        await asyncio.sleep(0.2)


def assert_prefixes(texts: list[str], final: str) -> None:
    """Every text the bubble showed was a prefix of the final reply: nothing doubled, nothing lost."""
    for t in texts:
        assert final.startswith(t), f"the bubble showed {t!r}, which is not a prefix of {final!r}"


def new_user(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def slow_server(redis_url: str) -> Iterator[ServerProcess]:
    """Slow simulated tokens, so that a reply lasts seconds: long enough to cut or stop it.

    Heartbeats every second (3 s timeout), so a page treats 4 s of silence as a dead socket.
    """
    prefix = f"rapport-test-browser:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "40", "--sim-itl-ms", "60",
        "--sim-reply-tokens", "120", "--heartbeat-interval-ms", "1000",
        "--heartbeat-timeout-ms", "3000", "--auth", "dev"]).start()
    try:
        yield server
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)


class SocketCutter:
    """A TCP proxy on 127.0.0.1 in front of a server that can cut every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_count = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._frozen: set[asyncio.StreamWriter] = set()  # clients no longer sent anything
        self._tasks: set[asyncio.Task[None]] = set()
        self._refuse_until = 0.0

    async def start(self) -> SocketCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer, downstream=True))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
                self._tasks.discard(p)
            self._links.discard(link)
            self._frozen.discard(writer)
            for w in link:
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    downstream: bool = False) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if downstream and writer in self._frozen:
                    continue  # the server's bytes vanish: the client hears silence
                writer.write(data)
                await writer.drain()

    def freeze(self) -> int:
        """From now on drop everything the server sends on the open connections (new ones flow)."""
        self._frozen.update(client for client, _ in self._links)
        return len(self._links)

    def cut(self, refuse_for: float = 0.0) -> int:
        """Reset every open connection (both sides); refuse new ones for ``refuse_for`` seconds."""
        self._refuse_until = time.monotonic() + refuse_for
        links = list(self._links)
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        self.cut_count += len(links)
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


# ---------------------------------------------------------------- HTTP (no browser needed)


def test_page_and_assets_are_served_with_strict_headers(sim_server):
    with httpx.Client(base_url=sim_server.base, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert '<meta name="viewport"' in page.text
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml")):
            r = http.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
            assert r.headers["cache-control"] == "no-cache"
            again = http.get(f"/static/{name}", headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304
        for bad in ("/static/nope.js", "/static/..%2Fpage.py", "/static/.hidden", "/static/page.py"):
            assert http.get(bad).status_code == 404, bad
        config = http.get("/v1/page-config").json()
        assert config["auth"] == "dev" and config["model"].startswith("simulated")


def test_page_config_reports_jwt_mode(jwt_server):
    config = httpx.get(jwt_server.base + "/v1/page-config", timeout=10).json()
    assert config["auth"] == "jwt"


# ---------------------------------------------------------------- in the browser


async def test_reply_streams_into_the_page(browser, slow_server):
    user = new_user("stream")
    async with open_page(browser) as w:
        await connect_page(w, slow_server.base, user)
        assert await w.page.is_disabled("#send")  # nothing typed yet
        await say(w, "Hello! Tell me about your day.")
        await wait_for_seq(w, 3)
        # While the reply streams: Send is off, Stop is offered.
        assert await w.page.is_disabled("#send")
        assert await w.page.is_visible("#stop")
        await wait_ended(w)
        shown = await bubbles(w)
        assert [b["role"] for b in shown] == ["user", "assistant"]
        assert shown[0]["text"] == "Hello! Tell me about your day."
        reply = shown[1]
        assert reply["status"] == "stop" and reply["marker"] == "" and not reply["repaired"]
        stored = await stored_reply(slow_server, user, reply["turn_id"])
        assert reply["text"] == stored["text"] and stored["status"] == "stop"
        # The text grew delta by delta, each step a prefix of the final reply.
        texts = (await w.page.evaluate("() => window.__rec.texts"))[reply["turn_id"]]
        assert len([t for t in texts if t]) >= 20, texts
        assert [len(t) for t in texts] == sorted(len(t) for t in texts)
        assert_prefixes(texts, stored["text"])
        assert await w.page.is_hidden("#stop")
        # The protocol as the page spoke it.
        start = next(f for f in w.sent if f["type"] == "turn.start")
        assert len(start["client_turn_id"]) <= 64 and start["conversation_id"] == "default"
        hello = next(f for f in w.sent if f["type"] == "hello")
        assert hello["user"] == user and "token" not in hello
        assert any(f["type"] == "history.get" for f in w.sent)
        w.assert_clean()


async def test_dropped_socket_reconnects_and_resumes_exactly_once(browser, slow_server):
    user = new_user("resume")
    proxy = await SocketCutter(slow_server.port).start()
    try:
        async with open_page(browser) as w:
            await connect_page(w, proxy.base, user)
            await say(w, "Tell me a long story, please.")
            await wait_for_seq(w, 10)
            held = int(await w.page.get_attribute(".msg.assistant[data-seq]", "data-seq"))
            assert proxy.cut(refuse_for=0.4) >= 1
            # The page notices, waits (backoff with jitter), reconnects and resumes.
            await w.page.wait_for_function(
                "() => Number(document.getElementById('status').dataset.connects) >= 2", timeout=STEP_MS)
            await wait_ended(w)

            shown = await bubbles(w)
            assert [b["role"] for b in shown] == ["user", "assistant"], shown
            reply = shown[1]
            turn_id = reply["turn_id"]
            stored = await stored_reply(slow_server, user, turn_id)
            assert stored["status"] == "stop"
            assert reply["text"] == stored["text"]
            assert reply["text"].split() == stored["text"].split()
            assert not reply["repaired"], "the held deltas did not add up to the final text"
            texts = (await w.page.evaluate("() => window.__rec.texts"))[turn_id]
            assert_prefixes(texts, stored["text"])
            states = await w.page.evaluate("() => window.__rec.states")
            assert "reconnecting" in states and states[-1] == "connected", states

            # turn.resume asked for exactly what the page did not hold ...
            resumes = [f for f in w.sent if f["type"] == "turn.resume" and f["turn_id"] == turn_id]
            assert len(resumes) == 1, resumes
            after = resumes[0]["after_seq"]
            assert after >= held
            # ... and the new socket carried the rest, from after_seq + 1, without gaps.
            later = [f["seq"] for n, f in w.received
                     if n >= 2 and f.get("type") == "turn.delta" and f.get("turn_id") == turn_id]
            end = next(f for n, f in w.received if f.get("type") == "turn.end" and f.get("turn_id") == turn_id)
            assert later == list(range(after + 1, end["seq"] + 1)), (after, later[:5], end["seq"])
            first = [f["seq"] for n, f in w.received
                     if n == 1 and f.get("type") == "turn.delta" and f.get("turn_id") == turn_id]
            assert first == list(range(1, after + 1))
            w.assert_clean(allow=("WebSocket connection",))
    finally:
        await proxy.close()


async def test_unaccepted_turn_is_sent_again_after_a_silent_socket(browser, slow_server):
    """The server's answers stop arriving (no close, just silence) right before a turn.start.

    The page must notice the silence through its heartbeat (interval + timeout),
    reconnect, and send the same turn.start again; the server replays the one
    turn it accepted, so the conversation holds the message and its reply once.
    """
    user = new_user("silent")
    proxy = await SocketCutter(slow_server.port).start()
    try:
        async with open_page(browser) as w:
            await connect_page(w, proxy.base, user)
            assert proxy.freeze() >= 1
            await say(w, "Are you still there?")
            await w.page.wait_for_selector('.msg.user .marker[data-kind="sending"]')
            await w.page.wait_for_function(
                "() => Number(document.getElementById('status').dataset.connects) >= 2", timeout=STEP_MS)
            await wait_ended(w)

            starts = [f for f in w.sent if f["type"] == "turn.start"]
            assert len(starts) == 2 and starts[0]["client_turn_id"] == starts[1]["client_turn_id"]
            accepted = [f for n, f in w.received if f.get("type") == "turn.accepted"]
            assert len(accepted) == 1 and accepted[0]["replayed"] is True  # the first one went unheard

            shown = await bubbles(w)
            assert [(b["role"], b["status"]) for b in shown] == [("user", "sent"), ("assistant", "stop")]
            stored = await history_of(slow_server, user=user)
            assert [(m["role"], m["text"]) for m in stored] == [("user", "Are you still there?"),
                                                                ("assistant", shown[1]["text"])]
            assert not shown[1]["repaired"]
            assert_prefixes((await w.page.evaluate("() => window.__rec.texts"))[shown[1]["turn_id"]],
                            stored[1]["text"])
            assert "reconnecting" in await w.page.evaluate("() => window.__rec.states")
            w.assert_clean(allow=("WebSocket connection",))
    finally:
        await proxy.close()


async def test_reload_mid_reply_resumes_the_active_turn(browser, slow_server):
    user = new_user("reload")
    async with open_page(browser) as w:
        await connect_page(w, slow_server.base, user)
        await say(w, "Keep talking while I reload.")
        await wait_for_seq(w, 8)
        turn_id = await w.page.get_attribute(".msg.assistant[data-turn-id]", "data-turn-id")
        await w.page.reload()
        await w.page.wait_for_selector('#status[data-state="connected"]')
        await w.page.evaluate(RECORDER)
        await wait_ended(w)
        # A fresh page learns of the running turn from ready.active_turns and
        # resumes it from the start.
        assert {"type": "turn.resume", "turn_id": turn_id, "after_seq": 0} in w.sent
        shown = await bubbles(w)
        assert [(b["role"], b["turn_id"]) for b in shown] == [("user", turn_id), ("assistant", turn_id)]
        stored = await stored_reply(slow_server, user, turn_id)
        assert stored["status"] == "stop" and shown[1]["text"] == stored["text"]
        assert not shown[1]["repaired"]
        w.assert_clean()


async def test_duplicated_and_merged_deltas_are_shown_once(browser, sim_server):
    """Frames tampered with in flight: every third delta arrives twice (plus a stale one
    again), and pairs of deltas arrive merged into one frame (seq_start..seq). The page
    keeps the last seq per turn, ignores what it holds, and shows each word once."""
    user = new_user("dedupe")
    tampered = {"duplicates": 0, "merged": 0}

    def route(page_ws: Any) -> None:
        server_ws = page_ws.connect_to_server()
        held: list[dict] = []
        sent: list[dict] = []

        def deliver(frame: dict) -> None:
            page_ws.send(json.dumps(frame))
            sent.append(frame)

        def from_server(message: Any) -> None:
            frame = json.loads(message)
            if frame.get("type") == "turn.delta" and "seq_start" not in frame:
                seq = frame["seq"]
                if seq % 3 == 1:
                    held.append(frame)  # merged with the next one
                    return
                if seq % 3 == 2 and held:
                    first = held.pop()
                    deliver({**frame, "seq_start": first["seq"], "text": first["text"] + frame["text"]})
                    tampered["merged"] += 1
                    return
                deliver(frame)
                deliver(frame)  # the same delta again
                if len(sent) > 3:
                    deliver(sent[-4])  # and an older one
                tampered["duplicates"] += 1
                return
            if frame.get("type") == "turn.end" and held:
                deliver(held.pop())
            page_ws.send(message)

        server_ws.on_message(from_server)

    async with open_page(browser) as w:
        await w.page.route_web_socket("**/v1/ws", route)
        await connect_page(w, sim_server.base, user)
        await say(w, "Tell me something, twice over.")
        await wait_ended(w)
        reply = (await bubbles(w))[1]
        stored = await stored_reply(sim_server, user, reply["turn_id"])
        assert tampered["duplicates"] >= 2 and tampered["merged"] >= 2, tampered
        assert reply["text"] == stored["text"] and not reply["repaired"]
        assert_prefixes((await w.page.evaluate("() => window.__rec.texts"))[reply["turn_id"]], stored["text"])
        assert not [f for f in w.sent if f["type"] == "turn.resume"], "no gap, so nothing to resume"
        w.assert_clean()


async def test_stop_cancels_the_reply(browser, slow_server):
    user = new_user("stop")
    async with open_page(browser) as w:
        await connect_page(w, slow_server.base, user)
        await say(w, "Say something long.")
        await wait_for_seq(w, 5)
        await w.page.click("#stop")
        await w.page.wait_for_selector('.msg.assistant[data-status="cancelled"]', timeout=STEP_MS)
        reply = (await bubbles(w))[1]
        assert reply["marker"] == "Stopped"
        await asyncio.sleep(1.5)
        assert (await bubbles(w))[1]["text"] == reply["text"], "the reply kept growing after Stop"
        cancels = [f for f in w.sent if f["type"] == "turn.cancel"]
        assert cancels == [{"type": "turn.cancel", "turn_id": reply["turn_id"]}]
        stored = await stored_reply(slow_server, user, reply["turn_id"])
        assert stored["status"] == "cancelled"
        assert stored["text"] == reply["text"]
        assert 0 < len(stored["text"].split()) < 120
        assert await w.page.is_hidden("#stop")

        # A reload renders the same conversation from history, cancelled marker included.
        await w.page.reload()
        await w.page.wait_for_selector('.msg.assistant[data-status="cancelled"]')
        again = await bubbles(w)
        assert [(b["role"], b["text"]) for b in again] == [("user", "Say something long."),
                                                          ("assistant", reply["text"])]
        assert again[1]["marker"] == "Stopped"
        w.assert_clean()


async def test_rate_limited_turn_shows_inline_and_retries(browser, redis_url):
    prefix = f"rapport-test-browser:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "5",
        "--turns-per-minute", "1", "--auth", "dev"]).start()
    try:
        async with open_page(browser) as w:
            await connect_page(w, server.base, new_user("limited"))
            await say(w, "first")
            await wait_ended(w)
            await say(w, "second, too soon")
            error = w.page.locator(".msg.user .inline-error")
            await error.wait_for()
            assert "too quickly" in await error.text_content()
            assert "Retrying in" in await error.text_content()
            refusal = next(f for n, f in w.received if f.get("type") == "error")
            assert refusal["code"] == "rate_limited" and refusal["retry_after_ms"] > 0
            # The message waits for its retry: not sent twice meanwhile, Send stays off.
            assert await w.page.is_disabled("#send")
            assert len([f for f in w.sent if f["type"] == "turn.start"]) == 2
            w.assert_clean()
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)


async def test_jwt_mode_asks_for_a_token(browser, jwt_server):
    user = new_user("jwt")
    async with open_page(browser) as w:
        await w.page.goto(jwt_server.base + "/")
        await w.page.wait_for_selector("#signin:not([hidden])")
        assert await w.page.text_content("#signin-label") == "Access token"
        await w.page.fill("#signin-value", "not-a-token")
        await w.page.click("#signin-submit")
        # 4401: the page does not retry with a bad token; it asks again.
        await w.page.wait_for_selector("#signin-error:not([hidden])")
        assert await w.page.get_attribute("#status", "data-state") == "unauthorized"

        await w.page.fill("#signin-value", make_token(user))
        await w.page.click("#signin-submit")
        await w.page.wait_for_selector('#status[data-state="connected"]')
        assert await w.page.evaluate("() => localStorage.getItem('rapport.token')") is not None
        await say(w, "hi")
        await wait_ended(w)
        reply = (await bubbles(w))[1]
        hellos = [f for f in w.sent if f["type"] == "hello"]
        assert all("user" not in h for h in hellos) and hellos[-1]["token"]
        stored = await history_of(jwt_server, token=make_token(user))
        assert stored[-1]["text"] == reply["text"]
        w.assert_clean(allow=("WebSocket connection",))


async def test_phone_screenshot(browser, sim_server):
    user = new_user("phone")
    async with open_page(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                         is_mobile=True, has_touch=True, color_scheme="light") as w:
        await connect_page(w, sim_server.base, user)
        for n, text in enumerate(["Hi! I just got back from a long walk by the sea.",
                                  "It was windy, but the light on the water was beautiful."], start=1):
            await say(w, text)
            await wait_ended(w, n)
        # Nothing sticks out sideways on a narrow screen.
        assert await w.page.evaluate("() => document.documentElement.scrollWidth") <= 390
        for selector in ("#send", "#input", "#menu-button"):
            box = await w.page.locator(selector).bounding_box()
            assert box is not None and box["height"] >= 44, selector  # tap targets
        await w.page.wait_for_timeout(300)  # let the bubble animation settle
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await w.page.screenshot(path=str(SCREENSHOT))
        w.assert_clean()
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (780, 1688)
    assert len(data) > 20_000
