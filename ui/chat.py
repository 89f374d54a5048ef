"""``yaie chat``: a terminal chat that streams replies and shows what the engine is doing.

The app holds the conversation and a ``ChatBackend`` (``ui/chat_backend.py``): the engine in
this process or an OpenAI-compatible server. Each turn runs in one Textual worker, so stopping
is cancelling that worker: the cancellation closes the backend's stream, and closing it is what
aborts the request in the engine and frees its KV blocks (or closes the HTTP stream, which a
server takes as the same). A reply streams as plain text and becomes Markdown once complete:
re-parsing Markdown for every token would be quadratic and flickers on half-written syntax.

The status bar reads the turn's own numbers (time to first token, decode speed, context used,
prompt tokens the prefix cache served) and, for the in-process engine, the KV pool.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import aclosing, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Markdown, Static, TextArea
from textual.worker import Worker, WorkerCancelled, WorkerFailed

from yaie.core.sampling import SamplingParams
from yaie.ui.chat_backend import BackendError, ChatBackend, ContextTooLong, KVUsage, ReplyChunk

# What /set may change, and how its value is read.
SETTINGS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "max_tokens": int,
    "seed": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
}
# `seed=none`: random again; `max_tokens=none`: until the context's end.
NULLABLE = {"max_tokens", "seed"}

HELP = """\
| command | does |
| --- | --- |
| `/clear` | forget the conversation (the system prompt stays) |
| `/system TEXT` | set the system prompt; `/system` alone removes it |
| `/set temperature=0.7 top_p=0.9 max_tokens=256 seed=1` | change sampling; `/set` alone shows it |
| `/save FILE.json` or `/save FILE.md` | write the transcript |
| `/help` | this table |

**Enter** sends, **Shift+Enter** or **Ctrl+J** starts a new line, **Up/Down** on the first/last
line walk the input history, **Esc** or **Ctrl+C** stops the reply, **Ctrl+Q** quits.
Settable: """ + ", ".join(f"`{name}`" for name in SETTINGS)


def apply_settings(params: SamplingParams, text: str) -> SamplingParams:
    """``"temperature=0.7 seed=1"`` → new params; ``ValueError`` naming the bad item otherwise."""
    changes: dict[str, float | int | None] = {}
    for item in text.split():
        name, sep, raw = item.partition("=")
        if not sep or not raw:
            raise ValueError(f"expected name=value, got {item!r}")
        kind = SETTINGS.get(name)
        if kind is None:
            raise ValueError(f"unknown setting {name!r}; settable: {', '.join(SETTINGS)}")
        if name in NULLABLE and raw.lower() == "none":
            changes[name] = None
            continue
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{name} must be {what}, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {raw!r}")
        changes[name] = value
    return replace(params, **changes)  # SamplingParams validates: ValueError naming the field


def describe_settings(params: SamplingParams) -> str:
    return " ".join(f"{name}={getattr(params, name)}" for name in SETTINGS)


@dataclass(slots=True)
class Conversation:
    """Every message of the chat; the model sees ``messages[start:]`` (older turns were trimmed
    to fit its context, but stay in the transcript)."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    start: int = 0

    def context(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages[self.start :]

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def drop_oldest_turn(self) -> bool:
        """Move the context's start to its next user message; False when only the newest user
        message is left (nothing can go without losing the question itself)."""
        for i in range(self.start + 1, len(self.messages)):
            if self.messages[i]["role"] == "user":
                self.start = i
                return True
        return False

    def clear(self) -> None:
        self.messages.clear()
        self.start = 0

    def save(self, path: Path, model: str, params: SamplingParams) -> None:
        if path.suffix == ".json":
            data = {
                "model": model,
                "settings": {name: getattr(params, name) for name in SETTINGS},
                "system": self.system,
                "messages": self.messages,
            }
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        elif path.suffix == ".md":
            parts = [f"# Chat with {model}\n"]
            if self.system:
                parts.append(f"**System:** {self.system}\n")
            for m in self.messages:
                who = "You" if m["role"] == "user" else model
                parts.append(f"**{who}:**\n\n{m['content']}\n")
            path.write_text("\n".join(parts))
        else:
            raise ValueError(f"cannot tell the format of {path.name!r}: name a .json or .md file")


@dataclass(slots=True)
class TurnStats:
    """One reply's numbers, timed where the user sees them (on this side of the backend)."""

    started: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None

    def add(self, chunk: ReplyChunk, now: float) -> None:
        if chunk.num_tokens:
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.tokens += chunk.num_tokens
        if chunk.completion_tokens is not None:  # the backend's own count wins
            self.tokens = chunk.completion_tokens
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.cached_tokens is not None:
            self.cached_tokens = chunk.cached_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time they took."""
        if self.tokens < 2 or self.last_token is None or self.last_token <= self.first_token:
            return None
        return (self.tokens - 1) / (self.last_token - self.first_token)


def status_line(turn: TurnStats | None, kv: KVUsage | None, max_model_len: int | None) -> str:
    parts = []
    context = 0
    if turn is not None:
        parts.append("TTFT –" if turn.ttft is None else f"TTFT {1000 * turn.ttft:.0f} ms")
        rate = turn.tokens_per_s
        parts.append("– tok/s" if rate is None else f"{rate:.1f} tok/s")
        context = (turn.prompt_tokens or 0) + turn.tokens
    parts.append(f"context {context}/{max_model_len or '?'}")
    if kv is not None:
        parts.append(f"KV {kv.used} used, {kv.cached} cached of {kv.total} blocks")
    if turn is not None and turn.cached_tokens is not None and turn.prompt_tokens:
        parts.append(f"prefix hits {turn.cached_tokens}/{turn.prompt_tokens} tokens")
    return " │ ".join(parts)


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter/Ctrl+J break the line, Up/Down on the
    first/last line walk the history of sent inputs (the unsent draft is kept)."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.sent: list[str] = []
        self._position = 0  # == len(self.sent): editing the draft
        self._draft = ""

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                if not self.sent or self.sent[-1] != text:
                    self.sent.append(text)
                self._position = len(self.sent)
                self.clear()
                self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or self._position == 0:
            super().action_cursor_up(select)
            return
        if self._position == len(self.sent):
            self._draft = self.text
        self._recall(self._position - 1)

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if select or self.cursor_location[0] < last_row or self._position == len(self.sent):
            super().action_cursor_down(select)
            return
        self._recall(self._position + 1)

    def _recall(self, position: int) -> None:
        self._position = position
        self.load_text(self.sent[position] if position < len(self.sent) else self._draft)
        self.move_cursor(self.document.end)


class Reply(Vertical):
    """The model's message: plain text while it streams, Markdown once it is complete."""

    def __init__(self, author: str) -> None:
        super().__init__(classes="message reply")
        self.border_title = author
        self.text = ""
        self.num_updates = 0  # how many times streamed text reached the screen
        self._body = Static("", classes="streaming")

    def compose(self) -> ComposeResult:
        yield self._body

    def append(self, text: str) -> None:
        if text:
            self.text += text
            self.num_updates += 1
            self._body.update(Text(self.text))

    async def finish(self, note: str | None) -> None:
        if not self.text and not note:  # failed before its first token: the error line says why
            await self.remove()
            return
        await self._body.remove()
        if self.text:
            await self.mount(Markdown(self.text))
        if note:
            await self.mount(Static(Text(note), classes="note"))


class ChatApp(App[str | None]):
    """Returns ``None`` on quit, or the message of a backend that could not start."""

    TITLE = "yaie chat"
    CSS = """
    #log { height: 1fr; padding: 0 1; }
    .message { height: auto; margin: 1 0 0 0; padding: 0 1; border: round $primary; }
    .user { border: round $accent; }
    .reply Markdown { margin: 0; padding: 0; }
    .reply Markdown > *:last-child { margin-bottom: 0; }
    .reply .note, .notice { color: $text-muted; text-style: italic; }
    .notice, .error { height: auto; margin: 1 0 0 1; }
    .error { color: $error; text-style: bold; }
    .help { height: auto; margin: 1 0 0 0; }
    #prompt { height: auto; min-height: 3; max-height: 10; border: round $accent; }
    #status { height: 1; padding: 0 1; background: $panel; color: $text; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        backend: ChatBackend,
        params: SamplingParams | None = None,
        system: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.params = params or SamplingParams(max_tokens=512, temperature=0.7, top_p=0.9)
        self.conversation = Conversation(system)
        self.generating = False
        self.turn: TurnStats | None = None
        self.kv: KVUsage | None = None
        self._polling = False
        self._worker: Worker | None = None

    def compose(self) -> ComposeResult:
        yield Header(icon="")
        yield VerticalScroll(id="log")
        prompt = PromptInput(id="prompt")
        prompt.border_title = "Message"
        prompt.border_subtitle = "Enter sends · Shift+Enter or Ctrl+J: new line · /help"
        yield prompt
        yield Static(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        try:
            await self.backend.open()
        except BackendError as exc:
            self.exit(str(exc), return_code=2)
            return
        self.sub_title = self.backend.model_name
        self.notice(f"Chatting with {self.backend.model_name}. /help lists commands.")
        self.query_one(PromptInput).focus()
        await self.refresh_status()
        self.set_interval(0.5, self.refresh_status)

    async def on_unmount(self) -> None:
        await self.backend.close()

    # ------------------------------------------------------------ view

    @property
    def log_view(self) -> VerticalScroll:
        return self.query_one("#log", VerticalScroll)

    def _add(self, widget, before=None) -> None:
        self.log_view.mount(widget, before=before)
        self.log_view.scroll_end(animate=False)

    def notice(self, text: str, before=None) -> None:
        self._add(Static(Text(text), classes="notice"), before)

    def error(self, text: str, before=None) -> None:
        self._add(Static(Text(text), classes="error"), before)

    async def refresh_status(self) -> None:
        """Redraw the status bar; the KV pool is read off the event loop (it waits for a step)."""
        if not self._polling:
            self._polling = True
            try:
                self.kv = await self.backend.kv_usage()
            finally:
                self._polling = False
        self._show_status(self.turn)

    def _show_status(self, turn: TurnStats | None) -> None:
        line = status_line(turn, self.kv, self.backend.max_model_len)
        # A poll that outlives the app (it waited for a step while the app closed) finds no bar.
        for status in self.query("#status").results(Static):
            status.update(Text(line))

    # ------------------------------------------------------------ input

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Stop only while a reply runs; otherwise Ctrl+C stays the input's copy key.
        return self.generating if action == "stop" else True

    def action_stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _stop_and_wait(self) -> None:
        if self.generating and self._worker is not None:
            self.action_stop()
            with suppress(WorkerCancelled, WorkerFailed):
                await self._worker.wait()

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if text.startswith("/"):
            await self.run_command(text)
            return
        if self.generating:
            self.query_one(PromptInput).load_text(event.text)  # keep it for when the reply ends
            self.error("A reply is still streaming: wait, or press Esc to stop it.")
            return
        user = Static(Text(text), classes="message user")
        user.border_title = "You"
        self._add(user)
        self.conversation.add("user", text)
        self._set_generating(True)
        self._worker = self.run_worker(self._reply(), group="reply")

    def _set_generating(self, value: bool) -> None:
        self.generating = value
        self.refresh_bindings()

    async def run_command(self, line: str) -> None:
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command == "/help":
            self._add(Markdown(HELP, classes="help"))
        elif command == "/clear":
            await self._stop_and_wait()
            await self.log_view.remove_children()
            self.conversation.clear()
            self.turn = None
        elif command == "/system":
            self.conversation.system = arg or None
            self.notice(f"System prompt: {arg}" if arg else "System prompt removed.")
        elif command == "/set":
            try:
                if arg:
                    self.params = apply_settings(self.params, arg)
            except ValueError as exc:
                self.error(f"/set: {exc}")
                return
            self.notice(describe_settings(self.params))
        elif command == "/save":
            if not arg:
                self.error("/save needs a file name ending in .json or .md")
                return
            path = Path(arg).expanduser()
            try:
                self.conversation.save(path, self.backend.model_name, self.params)
            except (OSError, ValueError) as exc:
                self.error(f"/save: {exc}")
                return
            self.notice(f"Saved {len(self.conversation.messages)} messages to {path}")
        else:
            self.error(f"Unknown command {command}; /help lists the commands.")
        await self.refresh_status()

    # ------------------------------------------------------------ a turn

    async def _reply(self) -> None:
        reply = Reply(self.backend.model_name.rsplit("/", 1)[-1] or "assistant")
        self._add(reply)
        turn = self.turn = TurnStats(time.monotonic())
        note = None
        try:
            note = await self._stream_into(reply, turn)
        except ContextTooLong as exc:
            self.error(
                f"Your message does not fit in the model's context ({exc}); shorten it "
                "or lower max_tokens.",
                before=reply,
            )
        except ValueError as exc:  # BackendError, or a chat template that rejects the messages
            self.error(str(exc), before=reply)
        except asyncio.CancelledError:
            note = "stopped"
            raise
        finally:
            self._set_generating(False)  # first: a second Esc must not cancel this cleanup
            if reply.text:
                self.conversation.add("assistant", reply.text)
            else:  # no answer: forget the question, so the next one is not a second user turn
                self.conversation.messages.pop()
            await reply.finish(note)
            await self.refresh_status()

    async def _stream_into(self, reply: Reply, turn: TurnStats) -> str | None:
        """Stream the reply, trimming the oldest turns while the conversation is too long;
        returns a note for the end of the reply (why it ended, when not naturally)."""
        dropped = 0
        while True:
            try:
                stream = self.backend.stream(self.conversation.context(), self.params)
                async with aclosing(stream) as chunks:
                    async for chunk in chunks:
                        turn.add(chunk, time.monotonic())
                        log = self.log_view
                        follow = log.scroll_y >= log.max_scroll_y  # unless the user scrolled up
                        reply.append(chunk.text)
                        if follow:
                            log.scroll_end(animate=False)
                        self._show_status(turn)
                break
            except ContextTooLong:
                if not self.conversation.drop_oldest_turn():
                    raise
                dropped += 1
        if dropped:
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            self.notice(
                f"The conversation outgrew the context: dropped the oldest {turns}.", before=reply
            )
        if turn.finish_reason == "length":
            return "cut short: max_tokens or the context's end reached"
        return None
