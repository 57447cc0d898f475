"""Slow, obviously-correct reference of the best-fit packing rules: the oracle for the Rust packer.

Plain lists, linear scans, and a deep copy for "undo". It follows DESIGN.md "Packer" line by line:

1. documents arrive in order; the buffer keeps them in arrival order;
2. before every placement the buffer is topped up to `buffer_size` documents from the stream;
3. a row holds `C = T_text + 1` tokens; with `remaining = C - pos`, place the longest buffered
   document with `len <= remaining` whole (ties: earliest arrived), or else the first `remaining`
   tokens of the shortest buffered document (ties: earliest arrived), discarding its rest;
4. inputs = row[:-1], targets = row[1:];
5. targets get `audio_prefix_len` leading -1s.

Pad mode (DESIGN.md "The chat half"): in step 3, when nothing fits and the row already holds a
document, the rest of the row is padding (input BOS, target -1) instead of a cropped document; an
empty row still crops the shortest document (one longer than a row). After `finish()` a started row
is padded when the buffer runs empty. Documents may carry a 0/1 mask: a target is -1 where the
target token's mask is 0.

A batch that cannot be completed (stream dry: a top-up falls short of `buffer_size` before
`finish()`, or the buffer is empty after it) returns None and changes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

PAD = None  # a padding position in a row


@dataclass
class ReferencePacker:
    sequence_len: int
    buffer_size: int = 1000
    audio_prefix_len: int = 0
    mode: str = "crop"
    bos_token_id: int = 0  # the input at padding positions
    # Documents as lists of (token, mask) pairs.
    pending: list[list[tuple[int, int]]] = field(default_factory=list)
    buffer: list[list[tuple[int, int]]] = field(default_factory=list)
    finished: bool = False
    tokens_padded: int = 0

    @property
    def capacity(self) -> int:
        return self.sequence_len - self.audio_prefix_len + 1

    def push(self, docs: list[list[int]], masks: list[list[int]] | None = None) -> None:
        if masks is None:
            masks = [[1] * len(d) for d in docs]
        self.pending.extend(list(zip(d, m, strict=True)) for d, m in zip(docs, masks, strict=True))

    def finish(self) -> None:
        self.finished = True

    def _top_up(self) -> bool:
        while len(self.buffer) < self.buffer_size and self.pending:
            self.buffer.append(self.pending.pop(0))
        if self.finished:
            return len(self.buffer) > 0
        return len(self.buffer) == self.buffer_size

    def _choose(self, remaining: int) -> int | None:
        """Index of the buffered document to place, None to pad the rest of the row."""
        fitting = [i for i, d in enumerate(self.buffer) if len(d) <= remaining]
        if fitting:
            longest = max(len(self.buffer[i]) for i in fitting)
            return next(i for i in fitting if len(self.buffer[i]) == longest)
        if self.mode == "pad" and remaining < self.capacity:
            return None
        shortest = min(len(d) for d in self.buffer)
        return next(i for i, d in enumerate(self.buffer) if len(d) == shortest)

    def _row(self) -> list | None:
        row: list = []
        while len(row) < self.capacity:
            if not self._top_up():
                if self.mode == "pad" and self.finished and row:
                    break
                return None
            remaining = self.capacity - len(row)
            index = self._choose(remaining)
            if index is None:
                break
            row.extend(self.buffer.pop(index)[:remaining])
        self.tokens_padded += self.capacity - len(row)
        return row + [PAD] * (self.capacity - len(row))

    def pack(self, batch_size: int) -> tuple[list[list[int]], list[list[int]]] | None:
        """(inputs rows, targets rows) for one batch, or None with nothing changed."""
        saved = copy.deepcopy((self.pending, self.buffer, self.tokens_padded))
        rows = []
        for _ in range(batch_size):
            row = self._row()
            if row is None:
                self.pending, self.buffer, self.tokens_padded = saved
                return None
            rows.append(row)
        inputs = [[self.bos_token_id if p is PAD else p[0] for p in row[:-1]] for row in rows]
        targets = [[-1] * self.audio_prefix_len + [-1 if p is PAD or p[1] == 0 else p[0] for p in row[1:]]
                   for row in rows]
        return inputs, targets
