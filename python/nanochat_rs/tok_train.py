"""Train the project tokenizer on the parquet shards: `nanochat-tok-train` / `python -m nanochat_rs.tok_train`.

    nanochat-tok-train                                  # the dataset (the embedded corpus when none)
    nanochat-tok-train --vocab-size 32768 --max-chars 2000000000 --data-dir DIR

The last shard is held out to report compression (bytes per token). The tokenizer is saved to
$NANOCHAT_BASE_DIR/tokenizer unless --output-dir says otherwise. Errors follow the policy of
`nanochat_rs.cli`: one line on stderr, exit 2 for bad options, 1 for bad or missing data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanochat_rs import cli
from nanochat_rs.dataset import TEXT_COLUMN, check_text_column, embedded_corpus_dir, list_parquet_files
from nanochat_rs.report import append_section
from nanochat_rs.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir

__all__ = ["DEFAULT_TOKENIZER_VOCAB", "ProgressPrinter", "TokTrainReport", "bytes_per_token", "iter_text_columns",
           "load_or_train_tokenizer", "main", "train_on_shards"]

DEFAULT_TOKENIZER_VOCAB = 4096
"""Vocabulary of the tokenizer `load_or_train_tokenizer` trains on the embedded corpus (a small corpus
for CPU-sized models); train a bigger one on real data with `nanochat-tok-train`."""

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def iter_text_columns(shards: list[Path]) -> Iterator[Any]:
    """One Arrow string array per row group: the trainer reads them in place, no per-row objects.
    ValueError for a shard without a `text` column of strings."""
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        check_text_column(shard, parquet.schema_arrow)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)


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
    check_text_column(shard, pq.read_schema(shard))
    column = pq.read_table(shard, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
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


def load_or_train_tokenizer(directory: str | os.PathLike[str] | None = None,
                            vocab_size: int = DEFAULT_TOKENIZER_VOCAB) -> Tokenizer:
    """The tokenizer saved in `directory` (default `$NANOCHAT_BASE_DIR/tokenizer`); when there is none
    yet, train a `vocab_size` one on the embedded corpus, save it there and return it. This is what
    lets the main commands run offline on a fresh machine."""
    path = Path(directory) if directory is not None else tokenizer_dir()
    try:
        return Tokenizer.load(path)
    except FileNotFoundError:
        pass
    shards = sorted(embedded_corpus_dir().glob("shard_*.parquet"))[:-1]  # the last shard is validation
    print(f"No tokenizer in {path}: training a {vocab_size}-token one on the embedded corpus "
          f"({len(shards)} shards); train your own with `nanochat-tok-train`")
    tokenizer = Tokenizer.train(iter_text_columns(shards), vocab_size)
    tokenizer.save(path)
    return tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat-tok-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help=f"including the {len(SPECIAL_TOKENS)} special tokens (at least {MIN_VOCAB_SIZE})")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop reading after this many chars")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory of shard_NNNNN.parquet files (default: the dataset, else the embedded corpus)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise cli.UsageError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {args.vocab_size}")
    for flag, value in (("--max-chars", args.max_chars), ("--doc-cap", args.doc_cap)):
        if value < 1:
            raise cli.UsageError(f"{flag} must be positive, got {value}")


def _run(args: argparse.Namespace) -> None:
    _check_args(args)
    shards = list_parquet_files(args.data_dir)
    train_shards, val_shard = shards[:-1], (shards[-1] if len(shards) > 1 else None)
    print(f"training a {args.vocab_size:,}-token tokenizer on {len(train_shards)} shard(s) "
          f"(max {args.max_chars:,} chars, documents capped at {args.doc_cap:,} chars)")
    tokenizer, report = train_on_shards(train_shards, val_shard, args.vocab_size, args.max_chars, args.doc_cap)
    out = tokenizer.save(args.output_dir or tokenizer_dir())
    print("\n".join(report.lines()))
    print(f"saved to:     {out}")
    append_section("tokenizer", {"wall_time_s": report.seconds, **asdict(report), "directory": str(out)})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.run_job(lambda: _run(args))


if __name__ == "__main__":
    main()
