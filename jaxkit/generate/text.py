"""A generated sequence's text on the host: incremental detokenization and
stop strings.

Each new token decodes a short window of the newest ids against the same
window without it (as vLLM's detokenizer does), so the cost per token does
not grow with the text and tokenizers that drop a leading space at a window
start still decode correctly. A window whose text ends in U+FFFD (a UTF-8
character cut between tokens, or bytes that are no character) stays open
for the next token, and only its text before the U+FFFD is shown. Text that
could be the start of a stop string is held back until it is known not to
be one, so what streams out is always a prefix of the final text.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one at a time (push); read the text that is ready."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # shown so far (cut before a stop string once one appears)
        self.released = 0  # characters of text handed out
        self.stopped = False  # a stop string appeared
        self._closed = ""  # the text of ids[:_read], whose windows are closed
        self._prefix = self._read = 0  # window start, first id of the open window

    def push(self, token: int) -> str:
        """Adds a token; returns the text it makes ready (possibly empty)."""
        if self.stopped:
            raise ValueError("this sequence already produced a stop string")
        self.ids.append(int(token))
        new = self._open_text()
        if new and not new.endswith(REPLACEMENT):
            self._closed += new
            self._prefix, self._read = self._read, len(self.ids)
            new = ""
        self.text = self._closed + new.rstrip(REPLACEMENT)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a cut character, a possible stop-string
        start); afterwards self.text is the whole text."""
        if not self.stopped:
            self.text = self._closed + self._open_text()
        return self._release(final=True)

    def _open_text(self) -> str:
        """The text the open window adds (ids from _read on)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        return self.tokenizer.decode(self.ids[self._prefix:])[len(before):]

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            longest = max(map(len, self.stop))
            start = max(0, self.released - longest + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text, self.stopped = self.text[:min(found)], True
        held = 0 if self.stopped or final else self._stop_prefix_length()
        piece = self.text[self.released:len(self.text) - held]
        self.released += len(piece)
        return piece

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of text that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
