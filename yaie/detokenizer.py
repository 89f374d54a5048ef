"""Stream a request's text one token at a time, and cut it at stop strings.

Decoding token by token is not ``decode([token])`` per token, for two reasons:

- A token is not always whole characters. Byte-level BPE and SentencePiece's byte fallback split
  an emoji or a CJK character into several tokens; decoding the first of them alone gives
  ``"\\ufffd"``. So new text is only released once the window decodes to complete characters.
- A token's text depends on its neighbours. SentencePiece marks a word's leading space on the
  token (``▁world``), and its decoder drops that space at the very start of a text, so
  ``decode([▁world])`` is ``"world"`` while after ``Hello`` it reads ``" world"``.

Both are solved the way vLLM's ``detokenize_incrementally`` (and TGI) do it: keep a small
window of ids that starts a few tokens *before* the unread ones (the "prefix"), decode the window
with and without the unread tokens, and release the difference. The prefix gives each new token
its left context; the window only slides forward once it ends on a complete character.

Stop strings are matched on the decoded text, so they match across token boundaries. Text that
could be the start of a stop string is held back until the next tokens settle it, so a client
never sees text that a stop later takes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# How many prompt tokens give the first output token its left context (vLLM uses the same).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The one tokenizer method the detokenizer needs (a Hugging Face tokenizer has it)."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool
    ) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, honouring its stop strings.

    Invariants: ``text`` is exactly the concatenation of every delta returned so far, and a
    delta never ends in a partial character. Once the request ends (``flush`` or a stop), ``text``
    is the output decoded as a continuation of the prompt, cut before the first stop string.
    That is ``decode(output)`` itself whenever the prompt is empty or the tokenizer is
    byte-level; with a SentencePiece tokenizer it keeps the leading space of the first output
    word (``"Hello"`` → ``" world"``), which a decode of the output alone would strip.

    Two cases no stream can match, so it does not try: tokenization-space cleanup (``" ."`` →
    ``"."``) rewrites text already shown, so it is off; and SentencePiece's byte-fallback
    decoder turns a whole run of byte tokens into ``"\ufffd"`` per byte if any of it is invalid
    UTF-8, so for such garbage runs the stream shows the valid head that a full decode would
    also have replaced.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        # The window: already-released prefix tokens, then tokens not yet released as text.
        self._window = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)
        # Decoded output text; the part past ``_emitted`` is held back as a possible stop.
        self._decoded = ""
        self._emitted = 0
        self.stopped = False
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of every delta)."""
        return self._decoded[: self._emitted]

    def step(self, token_id: int) -> str:
        """Add one output token; return the text it releases (often ``""``).

        After a stop string matched, the text is final and further tokens are ignored.
        """
        if self.stopped:
            return ""
        self._window.append(token_id)
        return self._release(self._decode_window(complete_only=True), final=False)

    def flush(self) -> str:
        """Release everything held back, for a request that ends other than by a stop string.

        That includes text held as a possible stop-string start and tokens that never completed
        a character (they decode to ``"\\ufffd"``, as a full decode would). A stop string that
        the flushed text completes still cuts it.
        """
        if self.stopped:
            return ""
        return self._release(self._decode_window(complete_only=False), final=True)

    def _decode_window(self, complete_only: bool) -> str:
        """Text the unread tokens add after the prefix; slide the window if any is released."""
        prefix_text = self._decode(self._window[: self._read_offset])
        full_text = self._decode(self._window)
        if len(full_text) <= len(prefix_text):
            return ""
        if complete_only and full_text.endswith(REPLACEMENT_CHAR):
            return ""  # the last character is still missing bytes: wait for more tokens
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _release(self, new_text: str, final: bool) -> str:
        """Append decoded text, cut at a stop string, and return what is now safe to show."""
        old_length = len(self._decoded)
        self._decoded += new_text
        match = self._find_stop(old_length)
        if match is not None:
            position, stop = match
            self._decoded = self._decoded[:position]
            self.stopped, self.matched_stop = True, stop
            end = position
        elif final:
            end = len(self._decoded)
        else:
            end = self._held_back_from()
        delta = self._decoded[self._emitted : end]
        self._emitted = end
        return delta

    def _find_stop(self, old_length: int) -> tuple[int, str] | None:
        """The earliest stop string that ends in the text added after ``old_length``."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            position = self._decoded.find(stop, max(0, old_length - len(stop) + 1))
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _held_back_from(self) -> int:
        """Where the longest unreleased tail that could still grow into a stop string starts.

        No full match is present (``_find_stop`` ran first), so only proper prefixes of a
        stop string, shorter than the longest stop, need checking.
        """
        text = self._decoded
        first = max(self._emitted, len(text) - self._longest_stop + 1)
        for start in range(first, len(text)):
            tail = text[start:]
            if any(stop.startswith(tail) for stop in self._stop):
                return start
        return len(text)
