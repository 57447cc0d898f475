"""Fine-tuning batches: conversations of a Task -> rendered with their loss masks -> Rust pad-mode packer.

`conversation_data_loader` walks a task (rank r takes examples r, r + W, r + 2W, ... under torchrun),
renders each conversation to token ids plus its supervision mask (`conversation.render_conversation`),
and pushes them, masks included, zero-copy into a `BestFitPacker(mode="pad")`: best fit as in
pretraining, but a row that nothing fits any more is padded instead of cropping a conversation, so
no conversation is cut (except one longer than a whole row). Targets are -1 wherever the mask is 0 and
at padding. Packing, staging (pinned buffers on CUDA) and prefetching are the pretraining loader's
(`dataloader.staged_batches`).

Each batch's `state` records the read position, the packer state and `consumed`: conversations placed
into rows so far by all ranks (this rank's count times the world size), which is how fine-tuning
measures its progress through an epoch. `resume_state=state` continues with exactly the batches that
followed. The stream cycles through the task epoch after epoch; the caller decides when to stop.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanochat_rs.common import get_dist_info
from nanochat_rs.conversation import ChatTokenizer, render_conversation
from nanochat_rs.dataloader import check_loader_state, staged_batches
from nanochat_rs.packer import SFT_BUFFER_SIZE, BestFitPacker
from nanochat_rs.tasks.base import Task
from nanochat_rs.util import check_int

STATE_VERSION = 1
RENDER_CHUNK = 64  # conversations rendered per push: amortises the call into Rust


@dataclass
class ConversationCursor:
    """This rank's next conversation: its `index`-th (task example rank + index * world_size) in `epoch`."""

    epoch: int = 0
    index: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class ConversationStream:
    """Endless stream of this rank's rendered conversations as (tokens, offsets, mask) chunks."""

    def __init__(self, tokenizer: ChatTokenizer, task: Task, rank: int, world_size: int,
                 cursor: ConversationCursor, max_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._task = task
        self._rank = rank
        self._world_size = world_size
        self._max_tokens = max_tokens
        self.per_rank = len(range(rank, len(task), world_size))
        if self.per_rank == 0:
            raise ValueError(f"the task has {len(task)} conversations, fewer than the {world_size} ranks: "
                             f"rank {rank} would have none")
        self.cursor = cursor

    def next_chunk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens: list[int] = []
        mask: list[int] = []
        offsets = [0]
        for _ in range(RENDER_CHUNK):
            example = self._rank + self.cursor.index * self._world_size
            ids, supervised = render_conversation(self._tokenizer, self._task[example], self._max_tokens)
            tokens.extend(ids)
            mask.extend(supervised)
            offsets.append(len(tokens))
            index = self.cursor.index + 1
            self.cursor = (ConversationCursor(self.cursor.epoch, index) if index < self.per_rank
                           else ConversationCursor(self.cursor.epoch + 1, 0))
        return (np.asarray(tokens, dtype=np.uint32), np.asarray(offsets, dtype=np.int64),
                np.asarray(mask, dtype=np.uint8))


def _resume(state: Mapping[str, Any], identity: dict[str, Any], packer: BestFitPacker,
            per_rank: int) -> ConversationCursor:
    cursor = check_loader_state(state, "conversation loader", identity, ("epoch", "index"))
    if cursor["index"] >= per_rank:
        raise ValueError(f"resume_state['cursor'] points at conversation {cursor['index']} of this rank's {per_rank}")
    packer.load_state_dict(state["packer"])
    return ConversationCursor(**cursor)


def conversation_data_loader(tokenizer: Any, task: Task, batch_size: int, sequence_len: int,
                             device: str | torch.device = "cpu", *,
                             resume_state: Mapping[str, Any] | None = None, buffer_size: int = SFT_BUFFER_SIZE,
                             prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Endless (inputs, targets, state) batches of the task's conversations, packed in pad mode.

    inputs and targets: int64 (batch_size, sequence_len); targets are -1 where nothing is supervised.
    Arguments are checked now (a task with no examples is a ValueError); rendering starts on the first
    `next()`, so a malformed conversation raises its ValueError there. Close the iterator to stop its
    background thread.
    """
    B = check_int("batch_size", batch_size, 1)
    T = check_int("sequence_len", sequence_len, 1)
    if len(task) == 0:
        raise ValueError("the task has no conversations")
    device = torch.device(device)
    info = get_dist_info()
    packer = BestFitPacker(T, buffer_size=buffer_size, bos_token_id=tokenizer.bos_token_id, mode="pad")
    identity = {"version": STATE_VERSION, "task_size": len(task), "rank": info.rank,
                "world_size": info.world_size}
    stream = ConversationStream(tokenizer, task, info.rank, info.world_size, ConversationCursor(),
                                max_tokens=T + 1)  # a row holds T + 1 tokens: T inputs, shifted targets
    if resume_state is not None:
        stream.cursor = _resume(resume_state, identity, packer, stream.per_rank)
    return _with_consumed(staged_batches(stream, packer, identity, B, device, prefetch), info.world_size)


def _with_consumed(batches: Generator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                   world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    try:
        for inputs, targets, state in batches:
            stats = state["packer"]["stats"]
            yield inputs, targets, {**state, "consumed": (stats["docs_placed"] + stats["docs_cropped"]) * world_size}
    finally:
        batches.close()  # stops the loader's thread
