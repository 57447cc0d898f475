"""Train the BPE tokenizer on the parquet shards (the embedded corpus when no dataset is present).

    python scripts/tok_train.py --vocab-size 32768 --max-chars 2000000000
"""

import argparse
import sys
from pathlib import Path

from nanochat_rs.dataset import list_parquet_files
from nanochat_rs.tok_training import train_on_shards
from nanochat_rs.tokenizer import tokenizer_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32768, help="including the 9 special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop reading after this many chars")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many chars")
    parser.add_argument("--data-dir", type=Path, default=None, help="directory of shard_NNNNN.parquet files")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    args = parser.parse_args()

    shards = list_parquet_files(args.data_dir)
    train_shards, val_shard = shards[:-1], (shards[-1] if len(shards) > 1 else None)
    print(f"training a {args.vocab_size:,}-token tokenizer on {len(train_shards)} shard(s) "
          f"(max {args.max_chars:,} chars, documents capped at {args.doc_cap:,} chars)")
    try:
        tokenizer, report = train_on_shards(train_shards, val_shard, args.vocab_size, args.max_chars, args.doc_cap)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = tokenizer.save(args.output_dir or tokenizer_dir())
    print("\n".join(report.lines()))
    print(f"saved to:     {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
