"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for supervised fine-tuning.

Conversations are used as given: an optional leading system message (merged into the first user
message when rendered, see nanochat_rs.conversation), then user and assistant turns alternating,
ending with the assistant. Rows of any other shape are skipped when the task loads, the same rows
on every rank and every run, and counted in `skipped`, so a few bad rows in a large public dataset
never stop a fine-tuning run.
"""

from __future__ import annotations

from typing import Any

from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.hub import HubTask


def is_well_formed(messages: Any) -> bool:
    """Whether `messages` is a conversation this task keeps (see the module docstring)."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return False
    roles = [m.get("role") for m in messages]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    return len(roles) >= 2 and len(roles) % 2 == 0 and all(
        role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles))


class SmolTalk(HubTask):
    """One split ("train" or "test") of smol-smoltalk, without the malformed conversations."""

    eval_type = "generative"
    REPO = "HuggingFaceTB/smol-smoltalk"
    SPLITS = {"default": ("train", "test")}

    def __init__(self, split: str = "train", **slice_args: int) -> None:
        super().__init__("default", split, ("messages",), **slice_args)
        kept: set[int] = set()
        offset = 0
        for batch in self.table.column("messages").chunks:  # one chunk at a time: memory stays bounded
            kept.update(offset + i for i, messages in enumerate(batch.to_pylist()) if is_well_formed(messages))
            offset += len(batch)
        self.skipped = len(self.order) - len(kept)
        self.order = [row for row in self.order if row in kept]  # the shuffled order, less the bad rows

    def get_example(self, index: int) -> Conversation:
        return [{"role": m["role"], "content": m["content"]} for m in self.row(index)["messages"]]
