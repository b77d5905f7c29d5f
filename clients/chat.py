"""Interactive terminal chat over :class:`clients.resilient.ResilientClient`.

    python -m clients.chat --user alice            # development mode
    RAPPORT_TOKEN=... python -m clients.chat --url wss://host/v1/ws

The reply is printed as it streams. ``/history``, ``/clear``, ``/quit``;
``/remember <text>`` pins a fact every conversation's model sees, ``/memory``
lists the pinned facts, ``/forget <id>`` unpins one;
Ctrl-C during a reply cancels the turn, Ctrl-C at the prompt quits.
Connection state changes go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from typing import Any, TextIO

from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

from .errors import AuthenticationError, ClientError, ServerError
from .resilient import ResilientClient

DEFAULT_URL = "ws://127.0.0.1:8000/v1/ws"
COMMANDS = "/history  /clear  /remember <text>  /memory  /forget <id>  /quit   (Ctrl-C cancels a reply)"


def _start_line_reader(stdin: TextIO, queue: asyncio.Queue[str | None]) -> None:
    """Read lines in a daemon thread: a blocked readline never holds up exit."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        try:
            for line in iter(stdin.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except RuntimeError:  # the loop closed while we were blocked: nobody is listening
            pass

    threading.Thread(target=pump, name="rapport-chat-stdin", daemon=True).start()


async def run_chat(url: str = DEFAULT_URL, *, token: str | None = None, user: str | None = None,
                   conversation_id: str = "default", subprotocol: str = JSON_SUBPROTOCOL,
                   stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
                   handle_sigint: bool | None = None, client_options: dict[str, Any] | None = None) -> int:
    """Run the chat until ``/quit`` or end of input; returns a process exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if handle_sigint is None:
        handle_sigint = stdin is sys.stdin and threading.current_thread() is threading.main_thread()
    interactive = stdin.isatty()

    def note(text: str) -> None:
        print(f"[{text}]", file=stderr, flush=True)

    def on_state(state: str) -> None:
        if state in ("connecting", "reconnecting", "ready", "closed"):
            note(state)

    client = ResilientClient(url, token=token, user=user, subprotocol=subprotocol, on_state=on_state,
                             **(client_options or {}))
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    try:
        ready = await client.connect()
        note(f"user {ready.get('user_id')} · model {ready.get('model')} · {COMMANDS}")
        _start_line_reader(stdin, lines)
        while True:
            if interactive:
                stdout.write("you> ")
                stdout.flush()
            line = await lines.get()
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            try:
                if text == "/history":
                    page = await client.history(conversation_id)
                    for msg in page.get("messages", []):
                        print(f"{msg.get('role')}: {msg.get('text')}", file=stdout)
                    stdout.flush()
                elif text == "/clear":
                    await client.clear_history(conversation_id)
                    note("history cleared")
                elif _command(text, "/remember"):
                    fact = text[len("/remember"):].strip()
                    if not fact:
                        note("usage: /remember <text>")
                    else:
                        await client.memory_add(fact)
                        note("remembered")
                elif text == "/memory":
                    _print_facts(await client.memory_list(), stdout)
                elif _command(text, "/forget"):
                    fact_id = text[len("/forget"):].strip()
                    if not fact_id:
                        note("usage: /forget <id>  (/memory shows the ids)")
                    else:
                        await client.memory_delete(fact_id)
                        note("forgotten")
                elif text.startswith("/"):
                    note(f"unknown command; {COMMANDS}")
                else:
                    await _reply(client, text, conversation_id, stdout, note, handle_sigint)
            except ServerError as exc:
                retry = f", retry in {exc.retry_after_ms} ms" if exc.retry_after_ms is not None else ""
                note(f"error {exc.code}: {exc.message}{retry}")
        return 0
    except AuthenticationError as exc:
        note(f"not authorized: {exc.message}")
        return 2
    except ClientError as exc:
        note(f"stopped: {exc}")
        return 1
    finally:
        await client.close()


def _command(text: str, name: str) -> bool:
    """``text`` is the command ``name``, bare or followed by whitespace and its argument."""
    return text == name or (text.startswith(name) and text[len(name)].isspace())


def _print_facts(answer: dict[str, Any], stdout: TextIO) -> None:
    facts = answer.get("facts") or []
    if not facts:
        print("(nothing pinned; /remember <text> pins a fact)", file=stdout)
    for fact in facts:
        print(f"{fact.get('id')}  {fact.get('text')}", file=stdout)
    stdout.flush()


async def _reply(client: ResilientClient, text: str, conversation_id: str, stdout: TextIO,
                 note: Any, handle_sigint: bool) -> None:
    turn = client.send(text, conversation_id=conversation_id)
    installed = False
    previous: Any = None
    if handle_sigint:
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, turn.cancel)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # no signal support here: Ctrl-C keeps its default meaning
    try:
        async for delta in turn:
            stdout.write(delta["text"])
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        reason = turn.end.get("finish_reason") if turn.end else None
        if reason != "stop":
            note(f"reply ended: {reason}")
    finally:
        if installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)


def add_chat_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("RAPPORT_TOKEN"),
                        help="JWT bearer token (default: $RAPPORT_TOKEN)")
    parser.add_argument("--user", default=None, help="user id, for a server in development mode")
    parser.add_argument("--conversation", default="default", help="conversation id (default 'default')")
    parser.add_argument("--msgpack", action="store_true", help="speak rapport.v1.msgpack instead of JSON")
    return parser


def chat_command(args: argparse.Namespace) -> int:
    """Entry point for an argparse subcommand; returns the exit code."""
    try:
        return asyncio.run(run_chat(
            args.url, token=args.token, user=args.user, conversation_id=args.conversation,
            subprotocol=MSGPACK_SUBPROTOCOL if args.msgpack else JSON_SUBPROTOCOL,
        ))
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = add_chat_arguments(argparse.ArgumentParser(prog="rapport-chat", description=__doc__.splitlines()[0]))
    return chat_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
