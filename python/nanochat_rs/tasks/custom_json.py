"""Your own conversations from a JSONL file: one conversation per line, as a list of messages or as
{"messages": [...]} (nanochat's CustomJSON, e.g. its identity_conversations.jsonl).

    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "..."}]}

Every line is checked when the file is loaded, so a malformed conversation is reported with its line
number before training starts rather than from inside the data loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanochat_rs.conversation import validate_conversation
from nanochat_rs.tasks.base import Conversation, Task


class CustomJSON(Task):
    """The conversations of a JSONL file (blank lines are skipped)."""

    def __init__(self, path: str | Path, **slice_args: int) -> None:
        super().__init__(**slice_args)
        self.path = Path(path)
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"conversation file {self.path} does not exist") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path} is not UTF-8 text: {e}") from None
        self.conversations = [self._parse(number, line) for number, line in enumerate(lines, start=1)
                              if line.strip()]

    def _parse(self, number: int, line: str) -> Conversation:
        where = f"{self.path}:{number}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else record
        try:
            validate_conversation(messages)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return list(messages)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return self.conversations[index]
