"""Slow, obviously-correct reference of the best-fit packing rules: the oracle for the Rust packer.

Plain lists, linear scans, and a deep copy for "undo". It follows DESIGN.md "Packer" line by line:

1. documents arrive in order; the buffer keeps them in arrival order;
2. before every placement the buffer is topped up to `buffer_size` documents from the stream;
3. a row holds `C = T_text + 1` tokens; with `remaining = C - pos`, place the longest buffered
   document with `len <= remaining` whole (ties: earliest arrived), or else the first `remaining`
   tokens of the shortest buffered document (ties: earliest arrived), discarding its rest;
4. inputs = row[:-1], targets = row[1:];
5. targets get `audio_prefix_len` leading -1s.

A batch that cannot be completed (stream dry: a top-up falls short of `buffer_size` before
`finish()`, or the buffer is empty after it) returns None and changes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass
class Placement:
    """One placement decision, with the buffer as it was when the decision was made."""

    doc: list[int]
    remaining: int
    whole: bool
    buffer: list[list[int]]


@dataclass
class ReferencePacker:
    sequence_len: int
    buffer_size: int = 1000
    audio_prefix_len: int = 0
    pending: list[list[int]] = field(default_factory=list)
    buffer: list[list[int]] = field(default_factory=list)
    finished: bool = False
    placements: list[Placement] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.sequence_len - self.audio_prefix_len + 1

    def push(self, docs: list[list[int]]) -> None:
        self.pending.extend(list(d) for d in docs)

    def finish(self) -> None:
        self.finished = True

    def _top_up(self) -> bool:
        while len(self.buffer) < self.buffer_size and self.pending:
            self.buffer.append(self.pending.pop(0))
        if self.finished:
            return len(self.buffer) > 0
        return len(self.buffer) == self.buffer_size

    def _choose(self, remaining: int) -> tuple[int, bool]:
        fitting = [i for i, d in enumerate(self.buffer) if len(d) <= remaining]
        if fitting:
            longest = max(len(self.buffer[i]) for i in fitting)
            return next(i for i in fitting if len(self.buffer[i]) == longest), True
        shortest = min(len(d) for d in self.buffer)
        return next(i for i, d in enumerate(self.buffer) if len(d) == shortest), False

    def _row(self) -> list[int] | None:
        row: list[int] = []
        while len(row) < self.capacity:
            if not self._top_up():
                return None
            remaining = self.capacity - len(row)
            index, whole = self._choose(remaining)
            self.placements.append(Placement(self.buffer[index], remaining, whole, [list(d) for d in self.buffer]))
            doc = self.buffer.pop(index)
            row.extend(doc[:remaining])
        return row

    def pack(self, batch_size: int) -> tuple[list[list[int]], list[list[int]]] | None:
        """(inputs rows, targets rows) for one batch, or None with nothing changed."""
        saved = copy.deepcopy((self.pending, self.buffer, self.placements))
        rows = []
        for _ in range(batch_size):
            row = self._row()
            if row is None:
                self.pending, self.buffer, self.placements = saved
                return None
            rows.append(row)
        inputs = [row[:-1] for row in rows]
        targets = [[-1] * self.audio_prefix_len + row[1:] for row in rows]
        return inputs, targets
