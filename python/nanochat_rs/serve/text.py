"""A reply's text as it streams: tokens in, only the text that can no longer change out.

Two things may not be sent yet at any moment: a trailing partial UTF-8 character (a multi-byte
character can be split across tokens, and decodes as U+FFFD until it is complete), and a tail that
could still grow into one of the request's stop strings (a matched stop string and what follows it
are never returned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["ReplyText"]

REPLACEMENT = "\ufffd"


class ReplyText:
    """Incremental text of one reply. `render(tokens)` turns the whole reply so far into text."""

    def __init__(self, render: Callable[[Sequence[int]], str], stops: Sequence[str] = ()) -> None:
        self._render = render
        self._stops = [stop for stop in stops if stop]
        self.tokens: list[int] = []
        self.text = ""  # everything released so far (the reply's text once finished)
        self.stopped = False  # a stop string was found: the reply ends at it

    def add(self, token: int) -> str:
        """Take one more token; return the newly releasable text ("" when there is none)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self._render(self.tokens)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._release(full[:cut])
        safe = full.rstrip(REPLACEMENT)
        return self._release(safe[:len(safe) - self._stop_prefix_len(safe)])

    def finish(self) -> str:
        """The reply ended: release what was held back (a reply cut mid-character ends in U+FFFD)."""
        if self.stopped:
            return ""
        full = self._render(self.tokens)
        cut = self._first_stop(full)
        self.stopped = cut is not None
        return self._release(full if cut is None else full[:cut])

    def _release(self, upto: str) -> str:
        new = upto[len(self.text):]
        self.text = upto
        return new

    def _first_stop(self, full: str) -> int | None:
        # released text never holds the start of a stop string: any such tail was held back
        found = [i for stop in self._stops if (i := full.find(stop, len(self.text))) != -1]
        return min(found, default=None)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
