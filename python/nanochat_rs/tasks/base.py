"""The Task protocol: an indexable, sliceable collection of conversations, plus mixtures and sequences."""

from __future__ import annotations

import operator
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from nanochat_rs.util import check_int

Conversation = list[dict[str, Any]]


class Task(ABC):
    """A read-only list of conversations. Subclasses implement `num_examples` and `get_example`.

    `start/stop/step` take a slice of the underlying examples (stop None = all), so held-out sets
    and quick subsets need no copies: `Arithmetic("test", stop=100)`.
    """

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        self.start = check_int("start", start, 0)
        self.stop = None if stop is None else check_int("stop", stop, 0)
        self.step = check_int("step", step, 1)

    @abstractmethod
    def num_examples(self) -> int:
        """How many examples the task has before slicing."""

    @abstractmethod
    def get_example(self, index: int) -> Conversation:
        """Example `index` of the unsliced task (0 <= index < num_examples())."""

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> Conversation:
        size = len(self)
        position = operator.index(index)
        if not -size <= position < size:
            raise IndexError(f"{type(self).__name__} has {size} examples, asked for index {position}")
        return self.get_example(self.start + (position % size) * self.step)

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Whether `completion` (the assistant's reply, decoded) answers `conversation` correctly.
        Tasks without an automatic check (mixtures, sequences) raise TypeError."""
        raise TypeError(f"{type(self).__name__} has no automatic evaluation; evaluate its tasks one by one")


class TaskSequence(Task):
    """The tasks one after the other."""

    def __init__(self, tasks: Sequence[Task], **slice_args: int) -> None:
        super().__init__(**slice_args)
        if not tasks:
            raise ValueError("a TaskSequence needs at least one task")
        self.tasks = list(tasks)

    def num_examples(self) -> int:
        return sum(len(task) for task in self.tasks)

    def get_example(self, index: int) -> Conversation:
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


class TaskMixture(Task):
    """All examples of the tasks in one seeded shuffle: the same seed gives the same order."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slice_args: int) -> None:
        super().__init__(**slice_args)
        self._sequence = TaskSequence(tasks)
        if len(self._sequence) == 0:
            raise ValueError("the task mixture is empty: every task has 0 examples after slicing")
        self._order = list(range(len(self._sequence)))
        random.Random(check_int("seed", seed, 0)).shuffle(self._order)

    def num_examples(self) -> int:
        return len(self._order)

    def get_example(self, index: int) -> Conversation:
        return self._sequence[self._order[index]]


SPLITS = ("train", "test")
_NUMBER = re.compile(r"-?\d+")
# a tool call and the output the engine forced after it, as they appear in a decoded reply
_TOOL_BLOCK = re.compile(r"<\|python_start\|>.*?(?:<\|python_end\|>|$)|<\|output_start\|>.*?(?:<\|output_end\|>|$)",
                         re.DOTALL)


class CalculatorTask(Task):
    """Seeded examples of one split whose assistant answers through the calculator tool; a reply is
    right when the last number it states is the tool's output (the exact final answer)."""

    DEFAULT_SIZES: dict[str, int] = {"train": 10_000, "test": 500}

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0, **slice_args: int) -> None:
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.size = check_int("size", self.DEFAULT_SIZES[split] if size is None else size, 1)
        self.seed = check_int("seed", seed, 0)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        """The generator of example `index`: a function of (task, seed, split, index) only."""
        return random.Random(f"{type(self).__name__}/{self.seed}/{self.split}/{index}")

    @staticmethod
    def answer(conversation: Conversation) -> str:
        """The reference result: the tool output in the assistant's reply."""
        return next(part["text"] for part in conversation[-1]["content"] if part["type"] == "python_output")

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """The last number the assistant states itself (outside tool calls and their forced output)
        must be the result: a reply that calls the tool correctly but never states the answer fails."""
        numbers = _NUMBER.findall(_TOOL_BLOCK.sub(" ", completion))
        return bool(numbers) and numbers[-1] == self.answer(conversation)
