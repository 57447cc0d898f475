"""Build the small corpus embedded in the package (python/nanochat_rs/data/corpus/).

It lets the whole pipeline (tokenizer training, pretraining, chat) run offline out of the box. Documents
are drawn from a directory of parquet shards with a `text` column (the project used a corpus of
public-domain PEPs, RFCs and speeches), shuffled deterministically, and written as zstd-compressed
shards: shard_00000.parquet .. for training, then one last shard for validation (the dataset convention:
the last shard is the validation split). Sizes are budgets for the *compressed* files, met by estimating
the compression ratio on a sample first.

    python scripts/make_embedded_corpus.py --source DIR_OF_PARQUET_SHARDS
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "python" / "nanochat_rs" / "data" / "corpus"
ZSTD_LEVEL = 19  # written once, read many times: spend the time on ratio
MAX_TOTAL_MB = 8.0  # the package must stay small


def read_documents(source: Path) -> list[str]:
    shards = sorted(source.glob("*.parquet"))
    if not shards:
        raise SystemExit(f"error: no parquet files in {source}")
    docs: list[str] = []
    for shard in shards:
        texts = pq.read_table(shard, columns=["text"]).column("text").to_pylist()
        docs.extend(t for t in texts if t and t.strip())
    return docs


def write_shard(path: Path | io.BytesIO, docs: list[str], row_group_docs: int) -> None:
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, path, compression="zstd", compression_level=ZSTD_LEVEL,
                   row_group_size=row_group_docs)


def compression_ratio(docs: list[str], row_group_docs: int) -> float:
    """Compressed bytes per UTF-8 text byte, measured on (up to) 300 documents."""
    sample = docs[:300]
    buffer = io.BytesIO()
    write_shard(buffer, sample, row_group_docs)
    return buffer.tell() / sum(len(d.encode("utf-8")) for d in sample)


def take(docs: list[str], start: int, text_budget: float) -> int:
    """Index one past the documents from `start` whose UTF-8 size fits in `text_budget` (at least one)."""
    used, end = 0, start
    while end < len(docs) and (end == start or used + len(docs[end].encode("utf-8")) <= text_budget):
        used += len(docs[end].encode("utf-8"))
        end += 1
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="directory of parquet shards (text column)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-mb", type=float, default=4.0, help="compressed size of the training shards")
    parser.add_argument("--val-mb", type=float, default=0.5, help="compressed size of the validation shard")
    parser.add_argument("--train-shards", type=int, default=2)
    parser.add_argument("--row-group-docs", type=int, default=32,
                        help="documents per row group (the loader strides row groups across ranks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.train_mb + args.val_mb > MAX_TOTAL_MB:
        raise SystemExit(f"error: the embedded corpus must stay <= {MAX_TOTAL_MB} MB")
    if args.train_shards < 1 or args.row_group_docs < 1:
        raise SystemExit("error: --train-shards and --row-group-docs must be >= 1")

    docs = read_documents(args.source)
    random.Random(args.seed).shuffle(docs)
    ratio = compression_ratio(docs, args.row_group_docs)
    mb = 1 << 20

    # Validation first so it never depends on the training budget.
    val_end = take(docs, 0, args.val_mb * mb / ratio)
    splits = []
    start = val_end
    for _ in range(args.train_shards):
        end = take(docs, start, args.train_mb * mb / args.train_shards / ratio)
        if end == start:
            raise SystemExit("error: the source corpus is too small for the requested sizes")
        splits.append(docs[start:end])
        start = end
    splits.append(docs[:val_end])

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("shard_*.parquet"):
        old.unlink()
    total = 0
    for index, shard_docs in enumerate(splits):
        path = args.out / f"shard_{index:05d}.parquet"
        write_shard(path, shard_docs, args.row_group_docs)
        size = path.stat().st_size
        total += size
        role = "val" if index == len(splits) - 1 else "train"
        print(f"{path.name}: {role:5s} {len(shard_docs):5d} docs, "
              f"{sum(len(d) for d in shard_docs) / mb:6.2f} M chars, {size / mb:5.2f} MB")
    print(f"total {total / mb:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
