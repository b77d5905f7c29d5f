"""clients/chat.py: the memory commands of ``rapport chat`` against a real server process."""

from __future__ import annotations

import io
import uuid

from conftest import ServerProcess
from wire import open_ws, recv_until, send

from clients.chat import run_chat
from protocol import client_frames


async def test_remember_memory_forget(sim_server: ServerProcess) -> None:
    user = f"chat-{uuid.uuid4().hex[:8]}"
    out, err = io.StringIO(), io.StringIO()
    script = "/remember I grow tomatoes\n/remember\n/memory\n/rememberx\n/quit\n"
    code = await run_chat(sim_server.ws_url, user=user, stdin=io.StringIO(script), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert "remembered" in err.getvalue() and "usage: /remember" in err.getvalue()
    assert "unknown command" in err.getvalue()  # "/rememberx" is not "/remember x"
    [line] = out.getvalue().splitlines()
    fact_id, text = line.split("  ", 1)
    assert fact_id.startswith("f_") and text == "I grow tomatoes"

    # The server holds it for the user, whichever client asks.
    ws = await open_ws(sim_server, user=user)
    try:
        await send(ws, client_frames.memory_list())
        frame = (await recv_until(ws, "memory"))[-1]
        assert [(f["id"], f["text"]) for f in frame["facts"]] == [(fact_id, "I grow tomatoes")]
    finally:
        await ws.close()

    out, err = io.StringIO(), io.StringIO()
    code = await run_chat(sim_server.ws_url, user=user, stdout=out, stderr=err,
                          stdin=io.StringIO(f"/forget {fact_id}\n/forget {fact_id}\n/memory\n"))
    assert code == 0
    assert "forgotten" in err.getvalue() and "error not_found" in err.getvalue()
    assert out.getvalue().splitlines() == ["(nothing pinned; /remember <text> pins a fact)"]
