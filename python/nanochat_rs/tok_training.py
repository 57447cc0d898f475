"""Training the project tokenizer on parquet shards, with progress and a report (tok_train.py's logic)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanochat_rs.tokenizer import Tokenizer


def iter_text_columns(shards: list[Path]) -> Iterator[Any]:
    """One Arrow string array per row group: the trainer reads them in place, no per-row objects."""
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        if "text" not in parquet.schema_arrow.names:
            raise ValueError(f"{shard} has no 'text' column (columns: {parquet.schema_arrow.names})")
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=["text"]).column("text")


class ProgressPrinter:
    """A one-line progress display on stderr for the two phases of training."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.25 and done != total:
            return
        self.last = now
        elapsed = now - self.start
        if phase == "count":
            of = f" / {total / 1e6:,.0f}M" if total else ""
            line = f"counting: {done / 1e6:,.1f}M{of} chars  ({done / 1e6 / max(elapsed, 1e-9):,.1f} M chars/s)"
        else:
            line = f"merging: {done:,}/{total:,} merges  ({100 * done / max(total, 1):.0f}%)"
        end = "\n" if phase == "merge" and done == total else ""
        print(f"\r{line:<72}", end=end, file=self.stream, flush=True)


@dataclass
class TokTrainReport:
    vocab_size: int
    chars: int
    bytes: int
    seconds: float
    val_bytes_per_token: float | None

    def lines(self) -> list[str]:
        out = [f"vocab size:   {self.vocab_size:,}",
               f"trained on:   {self.chars:,} chars ({self.bytes / 1e6:,.1f} MB) in {self.seconds:.2f} s",
               f"throughput:   {self.bytes / 1e6 / max(self.seconds, 1e-9):,.1f} MB/s"]
        if self.val_bytes_per_token is not None:
            out.append(f"validation:   {self.val_bytes_per_token:.3f} bytes/token")
        return out


def bytes_per_token(tokenizer: Tokenizer, shard: Path, max_docs: int | None = None) -> float:
    """Compression on held-out text: UTF-8 bytes divided by tokens."""
    column = pq.read_table(shard, columns=["text"]).column("text")
    if max_docs is not None:
        column = column.slice(0, max_docs)
    tokens, _ = tokenizer.encode_arrow(column)
    n_bytes = pc.sum(pc.binary_length(column)).as_py() or 0  # computed in Arrow: no per-row str objects
    return n_bytes / max(len(tokens), 1)


def train_on_shards(train_shards: list[Path], val_shard: Path | None, vocab_size: int, max_chars: int,
                    doc_cap: int, show_progress: bool = True) -> tuple[Tokenizer, TokTrainReport]:
    if not train_shards:
        raise ValueError("no training shards: need at least two parquet shards (the last one is validation)")
    progress = ProgressPrinter() if show_progress else None
    start = time.perf_counter()
    tokenizer, read = Tokenizer.train_with_stats(iter_text_columns(train_shards), vocab_size, doc_cap=doc_cap,
                                                 max_chars=max_chars, progress=progress)
    seconds = time.perf_counter() - start
    val_bpt = bytes_per_token(tokenizer, val_shard) if val_shard is not None else None
    # Chars are what the budget counts; bytes are the fair unit for throughput across languages.
    return tokenizer, TokTrainReport(tokenizer.vocab_size, read.chars, read.bytes, seconds, val_bpt)
