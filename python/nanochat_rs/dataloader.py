"""Pretraining batches: parquet row groups -> Rust encoder -> Rust best-fit packer -> device.

`tokenizing_data_loader` reads the `text` column of the shards one row group at a time (row group
`i` of the split goes to rank `i % world_size`), encodes slices of it with
`Tokenizer.encode_arrow` straight from the Arrow buffers (parallel, in Rust, BOS prepended), pushes
the flat tokens into a `BestFitPacker`, and packs rows directly into CPU staging buffers (pinned
when the device is CUDA). A background thread keeps the next batches ready; the consumer copies
each one to the device (non-blocking from pinned memory). There are always more staging slots than
batches in flight, and a slot is only refilled after the CUDA event recorded behind its copy has
completed, so a batch is never overwritten while its host-to-device copy runs.

Each batch comes with a JSON-serialisable `state`: the read position (epoch, row group, row) and the
packer state at the moment the batch was completed. Passing it as `resume_state` to a new loader
reproduces exactly the batches that followed it. The data stream is infinite: both splits cycle
through their row groups epoch after epoch (the caller bounds the number of steps).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat_rs.common import get_dist_info
from nanochat_rs.dataset import TEXT_COLUMN, check_text_column, list_parquet_files
from nanochat_rs.packer import BestFitPacker
from nanochat_rs.util import check_int

STATE_VERSION = 1
_POLL_S = 0.05  # how often a blocked worker checks whether the loader was closed


# ---- what each rank reads ------------------------------------------------------------------------


def split_files(split: str, data_dir: str | Path | None = None) -> list[Path]:
    """Train = every shard but the last, val = the last shard."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise ValueError(f"need at least 2 shards (train + the last one for val), found {len(files)}: "
                         f"{[f.name for f in files]}")
    return files[:-1] if split == "train" else files[-1:]


def rank_row_groups(files: list[Path], rank: int, world_size: int) -> list[tuple[int, int]]:
    """(file index, row group index) pairs of this rank: the split's i-th row group goes to rank i % world."""
    all_groups = [(f, g) for f, path in enumerate(files) for g in range(pq.ParquetFile(path).num_row_groups)]
    return all_groups[rank::world_size]


@dataclass
class Cursor:
    """Position of the next unread rows: `row` within the `index`-th row group of this rank, in `epoch`."""

    epoch: int = 0
    index: int = 0
    row: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "row": self.row}


class DocumentStream:
    """Endless stream of encoded documents (flat uint32 tokens + int64 offsets), epoch after epoch."""

    def __init__(self, tokenizer: Any, files: list[Path], row_groups: list[tuple[int, int]], cursor: Cursor,
                 batch_rows: int, num_threads: int | None) -> None:
        if not row_groups:
            raise ValueError(f"no row groups for this rank in {[f.name for f in files]}: the files hold no "
                             "data, or fewer row groups than there are ranks")
        self._tokenizer = tokenizer
        self._files = files
        self._row_groups = row_groups
        self._batch_rows = batch_rows
        self._num_threads = num_threads
        self.cursor = cursor
        self._loaded: tuple[int, pa.ChunkedArray] | None = None  # (row group index, its text column)
        # Only the file being read stays open: a dataset can have thousands of shards (and fds).
        self._parquet: tuple[int, pq.ParquetFile] | None = None
        self._empty_streak = 0  # consecutive row groups without a single document

    def _column(self, index: int) -> pa.ChunkedArray:
        if self._loaded is None or self._loaded[0] != index:
            file_index, group = self._row_groups[index]
            if self._parquet is None or self._parquet[0] != file_index:
                if self._parquet is not None:
                    self._parquet[1].close()
                self._parquet = (file_index, pq.ParquetFile(self._files[file_index]))
            parquet = self._parquet[1]
            check_text_column(self._files[file_index], parquet.schema_arrow)
            self._loaded = (index, parquet.read_row_group(group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN))
        return self._loaded[1]

    def _advance_row_group(self) -> None:
        self.cursor = Cursor(self.cursor.epoch, self.cursor.index + 1, 0)
        if self.cursor.index == len(self._row_groups):
            self.cursor = Cursor(self.cursor.epoch + 1, 0, 0)

    def next_chunk(self) -> tuple[np.ndarray, np.ndarray]:
        """Encode the next (up to `batch_rows`) documents and move the cursor past them."""
        while True:
            column = self._column(self.cursor.index)
            if self.cursor.row < len(column):
                break
            self._empty_streak = self._empty_streak + 1 if len(column) == 0 else 0
            if self._empty_streak >= len(self._row_groups):
                raise ValueError(f"the data has no documents: every row group of {[f.name for f in self._files]} "
                                 "assigned to this rank is empty")
            self._advance_row_group()
        texts = column.slice(self.cursor.row, self._batch_rows)
        tokens, offsets = self._tokenizer.encode_arrow(texts, prepend=self._tokenizer.bos_token_id,
                                                       num_threads=self._num_threads)
        self.cursor = Cursor(self.cursor.epoch, self.cursor.index, self.cursor.row + len(texts))
        self._empty_streak = 0
        return tokens, offsets


# ---- producing batches -------------------------------------------------------------------------------


@dataclass
class _Slot:
    inputs: torch.Tensor
    targets: torch.Tensor


class _BatchMaker:
    """Fills staging slots from the stream and snapshots the state that reproduces what follows."""

    def __init__(self, stream: ChunkStream, packer: BestFitPacker, identity: dict[str, Any]) -> None:
        self.stream = stream
        self.packer = packer
        self.identity = identity
        self._docs_per_batch = 0  # documents the last batch used up: how many to have pending

    def _docs_used(self) -> int:
        stats = self.packer.stats
        return stats["docs_placed"] + stats["docs_cropped"]

    def _docs_held(self) -> int:
        stats = self.packer.stats
        return stats["docs_buffered"] + stats["docs_pending"]

    def fill(self, slot: _Slot) -> dict[str, Any]:
        # The rows do not depend on how documents are chunked into pushes, so push ahead just
        # enough for a batch like the last one (a failed pack_into is undone, but its work is lost).
        wanted = self.packer.buffer_size + self._docs_per_batch + self._docs_per_batch // 2
        while self._docs_held() < wanted:
            self.packer.push(*self.stream.next_chunk())
        used_before = self._docs_used()
        while not self.packer.pack_into(slot.inputs, slot.targets):
            self.packer.push(*self.stream.next_chunk())
        self._docs_per_batch = self._docs_used() - used_before
        return {**self.identity, "cursor": self.stream.cursor.as_dict(), "packer": self.packer.state_dict()}


class _Failure:
    """An exception raised in the worker thread, to be re-raised in the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue
    return None


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _worker(maker: _BatchMaker, slots: list[_Slot], free: queue.Queue, ready: queue.Queue,
            stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            item = _get(free, stop)
            if item is None:
                return
            index, copied = item
            if copied is not None:
                copied.synchronize()  # the previous host-to-device copy out of this slot is done
            state = maker.fill(slots[index])
            _put(ready, (index, state), stop)
    except BaseException as error:  # noqa: BLE001 - every failure must reach the consumer
        _put(ready, _Failure(error), stop)


def _to_device(slot: _Slot, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Copy a slot out; returns the device tensors and the event that marks the copy complete."""
    if device.type == "cuda":
        inputs = slot.inputs.to(device, non_blocking=True)
        targets = slot.targets.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return inputs, targets, event
    # Synchronous copies: the slot is free again as soon as they return.
    return slot.inputs.to(device, copy=True), slot.targets.to(device, copy=True), None


def _batches(maker: _BatchMaker, slots: list[_Slot], device: torch.device,
             prefetch: int) -> Generator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    free: queue.Queue = queue.Queue()
    for i in range(len(slots)):
        free.put((i, None))
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    thread = threading.Thread(target=_worker, args=(maker, slots, free, ready, stop), daemon=True,
                              name="nanochat-dataloader")
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, _Failure):
                raise item.error
            index, state = item
            inputs, targets, copied = _to_device(slots[index], device)
            free.put((index, copied))
            yield inputs, targets, state
    finally:
        stop.set()
        thread.join()


# ---- public API ------------------------------------------------------------------------------------


def check_loader_state(state: object, what: str, identity: Mapping[str, Any],
                       cursor_keys: tuple[str, ...]) -> dict[str, int]:
    """The cursor of a saved loader `state` (the `cursor_keys`, non-negative ints), once the state is known
    to be `what` at `identity["version"]`, saved by a loader with this `identity`, and to hold a packer
    state; a ValueError naming the first problem otherwise."""
    version = identity["version"]
    if not isinstance(state, Mapping) or state.get("version") != version:
        raise ValueError(f"resume_state is not a {what} state of version {version}")
    for key, value in identity.items():
        if state.get(key) != value:
            raise ValueError(f"resume_state was saved with {key}={state.get(key)!r}, this loader has {value!r}")
    cursor = state.get("cursor")
    if not isinstance(cursor, Mapping) or set(cursor) != set(cursor_keys):
        raise ValueError(f"resume_state['cursor'] must be a dict with keys {', '.join(cursor_keys)}")
    values = {key: cursor[key] for key in cursor_keys}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values.values()):
        raise ValueError(f"resume_state['cursor'] must hold non-negative ints, got {dict(cursor)}")
    if "packer" not in state:
        raise ValueError("resume_state has no 'packer' state")
    return values


def _resume(state: Mapping[str, Any], identity: dict[str, Any], packer: BestFitPacker) -> Cursor:
    values = check_loader_state(state, "dataloader", identity, ("epoch", "index", "row"))
    if values["index"] >= identity["num_row_groups"]:
        raise ValueError(f"resume_state['cursor'] points at row group {values['index']} of "
                         f"{identity['num_row_groups']}")
    packer.load_state_dict(state["packer"])
    return Cursor(**values)


def tokenizing_data_loader(tokenizer: Any, batch_size: int, sequence_len: int, split: str,
                           device: str | torch.device = "cpu", *,
                           resume_state: Mapping[str, Any] | None = None, audio_prefix_len: int = 0,
                           buffer_size: int = 1000, data_dir: str | Path | None = None,
                           num_threads: int | None = None, tokenizer_batch_rows: int = 512,
                           prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Endless (inputs, targets, state) batches for pretraining.

    inputs: int64 (B, T - audio_prefix_len); targets: int64 (B, T) with -1 over the audio prefix, where
    B = batch_size and T = sequence_len.
    Every row is a full best-fit packing of BOS-prefixed documents (see `nanochat_rs.packer`).
    `state` is JSON-serialisable; `resume_state=state` continues with exactly the batches that
    followed it (the batch size may differ: rows are a stream). Under torchrun each rank reads
    its own row groups (`common.get_dist_info()`), and its state must be resumed on the same rank.
    Arguments are checked now; reading starts on the first `next()`. Close the iterator (or let
    it be garbage-collected) to stop its background thread.
    """
    B = check_int("batch_size", batch_size, 1)
    T = check_int("sequence_len", sequence_len, 1)
    tokenizer_batch_rows = check_int("tokenizer_batch_rows", tokenizer_batch_rows, 1)
    prefetch = check_int("prefetch", prefetch, 1)
    device = torch.device(device)
    info = get_dist_info()
    files = split_files(split, data_dir)
    row_groups = rank_row_groups(files, info.rank, info.world_size)
    packer = BestFitPacker(T, buffer_size=buffer_size, audio_prefix_len=audio_prefix_len,
                           bos_token_id=tokenizer.bos_token_id)
    identity = {"version": STATE_VERSION, "split": split, "rank": info.rank, "world_size": info.world_size,
                "files": [f.name for f in files], "num_row_groups": len(row_groups)}
    cursor = Cursor() if resume_state is None else _resume(resume_state, identity, packer)
    stream = DocumentStream(tokenizer, files, row_groups, cursor, tokenizer_batch_rows, num_threads)
    return staged_batches(stream, packer, identity, B, device, prefetch)


class ChunkStream(Protocol):
    """What `staged_batches` reads: chunks of documents for `BestFitPacker.push(*chunk)`, and a cursor
    whose `as_dict()` is the read position right after the last chunk."""

    @property
    def cursor(self) -> Any: ...

    def next_chunk(self) -> tuple[np.ndarray, ...]: ...


def staged_batches(stream: ChunkStream, packer: BestFitPacker, identity: dict[str, Any], batch_size: int,
                   device: torch.device,
                   prefetch: int) -> Generator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """(inputs, targets, state) batches packed from `stream` by a background thread into staging slots
    (pinned on CUDA) and copied to `device` (module docstring). `state` is `identity` plus the stream
    cursor and the packer state of the moment the batch was completed."""
    pin = device.type == "cuda"
    # One slot being filled, up to `prefetch` waiting, one being copied to the device.
    slots = [_Slot(torch.empty((batch_size, packer.text_len), dtype=torch.long, pin_memory=pin),
                   torch.empty((batch_size, packer.sequence_len), dtype=torch.long, pin_memory=pin))
             for _ in range(prefetch + 2)]
    return _batches(_BatchMaker(stream, packer, identity), slots, device, prefetch)
