"""Compression of our tokenizer beside GPT-2's and GPT-4's: `nanochat-tok-eval` / `python -m nanochat_rs.tok_eval`.

    nanochat-tok-eval                                   # $NANOCHAT_BASE_DIR/tokenizer on the dataset
    nanochat-tok-eval --tokenizer-dir DIR --data-dir DIR --max-docs 1000 --baselines gpt2

Measures bytes per token (UTF-8 bytes / tokens: higher is better) on the validation shard (the last shard
of the dataset, else of the embedded corpus) and on the small genre samples shipped with the package
(news, Python code, math, German, a chat), for our tokenizer and the tiktoken baselines. tiktoken
downloads the baselines' files once into its cache (TIKTOKEN_CACHE_DIR); offline they are skipped with a
note. The results are recorded as the "tokenizer-eval" section of the report card (`nanochat_rs.report`).
Errors follow `nanochat_rs.cli`: one line on stderr, exit 2 for bad options, 1 for a missing tokenizer
or data.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import tiktoken

from nanochat_rs import cli, report
from nanochat_rs.dataset import list_parquet_files
from nanochat_rs.tok_train import bytes_per_token
from nanochat_rs.tokenizer import Tokenizer, tokenizer_dir

__all__ = ["DEFAULT_BASELINES", "DEFAULT_MAX_DOCS", "OURS", "REPORT_STAGE", "VAL_TEXT", "evaluate_compression",
           "format_table", "genres_dir", "load_baselines", "load_genres", "main"]

DEFAULT_BASELINES = ("gpt2", "cl100k_base")  # GPT-2's and GPT-4's tokenizers
DEFAULT_MAX_DOCS = 5000  # of the validation shard: plenty for a stable ratio, seconds to encode
OURS = "ours"
VAL_TEXT = "val-shard"
REPORT_STAGE = "tokenizer-eval"


def genres_dir() -> Path:
    """The genre samples shipped inside the package, one `<genre>.txt` each."""
    return Path(__file__).resolve().parent / "data" / "genres"


def load_genres() -> dict[str, str]:
    """Genre name -> sample text, by name."""
    paths = sorted(genres_dir().glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no genre samples in {genres_dir()}: the installation is incomplete, "
                                "reinstall nanochat_rs")
    return {path.stem: path.read_text(encoding="utf-8") for path in paths}


def load_baselines(names: Sequence[str]) -> tuple[dict[str, tiktoken.Encoding], dict[str, str]]:
    """(name -> encoding, name -> why it could not be loaded): a baseline that tiktoken cannot download
    (offline) or that arrives corrupt is skipped, not fatal."""
    loaded, skipped = {}, {}
    for name in names:
        try:
            loaded[name] = tiktoken.get_encoding(name)
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; a hash mismatch is a ValueError
            skipped[name] = type(e).__name__
    return loaded, skipped


class _TiktokenColumnEncoder:
    """A tiktoken encoding with the one method of `Tokenizer` that `tok_train.bytes_per_token` calls, so the
    baselines are measured on exactly the documents and bytes that ours is."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    def encode_arrow(self, column: pa.ChunkedArray) -> tuple[list[int], None]:
        texts = [text or "" for text in column.to_pylist()]  # a null document is an empty one, as in ours
        return list(itertools.chain.from_iterable(self.encoding.encode_ordinary_batch(texts))), None


def _val_bytes_per_token(encoder: Tokenizer | tiktoken.Encoding, shard: Path, max_docs: int | None) -> float:
    column_encoder = encoder if isinstance(encoder, Tokenizer) else _TiktokenColumnEncoder(encoder)
    return bytes_per_token(column_encoder, shard, max_docs)  # type: ignore[arg-type]  # duck-typed, see above


def _count_tokens(encoder: Tokenizer | tiktoken.Encoding, text: str) -> int:
    return len(encoder.encode(text) if isinstance(encoder, Tokenizer) else encoder.encode_ordinary(text))


def evaluate_compression(tokenizer: Tokenizer, val_shard: Path | None, genres: Mapping[str, str],
                         baselines: Mapping[str, tiktoken.Encoding],
                         max_docs: int | None = DEFAULT_MAX_DOCS) -> dict[str, Any]:
    """Bytes per token of ours and each baseline on the first `max_docs` documents of `val_shard` (row
    `VAL_TEXT`, when a shard is given) and on each genre:
    {"vocab_size": {tokenizer: size}, "bytes_per_token": {text: {tokenizer: ratio}}}, ours first."""
    encoders: dict[str, Tokenizer | tiktoken.Encoding] = {OURS: tokenizer, **baselines}
    ratios: dict[str, dict[str, float]] = {}
    if val_shard is not None:
        ratios[VAL_TEXT] = {name: _val_bytes_per_token(enc, val_shard, max_docs) for name, enc in encoders.items()}
    for genre, text in genres.items():
        n_bytes = len(text.encode("utf-8"))
        ratios[genre] = {name: n_bytes / max(_count_tokens(enc, text), 1) for name, enc in encoders.items()}
    vocab_sizes = {name: enc.vocab_size if isinstance(enc, Tokenizer) else enc.n_vocab
                   for name, enc in encoders.items()}
    return {"vocab_size": vocab_sizes, "bytes_per_token": ratios}


def _relative(ours: float, baseline: float) -> str:
    """How many fewer tokens ours needs than the baseline for the same bytes (negative: more)."""
    return f"{100 * (1 - baseline / ours):+.1f}%" if ours else "-"


def format_table(result: Mapping[str, Any]) -> str:
    """The result of `evaluate_compression` as a text table: a row per text, bytes per token per tokenizer,
    each baseline followed by our relative difference to it; vocabulary sizes in the last row."""
    vocab_sizes: Mapping[str, int] = result["vocab_size"]
    baselines = [name for name in vocab_sizes if name != OURS]
    header = ["text", OURS, *itertools.chain.from_iterable((name, f"vs {name}") for name in baselines)]
    rows = []
    for text, ratios in result["bytes_per_token"].items():
        cells = [text, f"{ratios[OURS]:.2f}"]
        for name in baselines:
            cells += [f"{ratios[name]:.2f}", _relative(ratios[OURS], ratios[name])]
        rows.append(cells)
    rows.append(["vocab size", f"{vocab_sizes[OURS]:,}",
                 *itertools.chain.from_iterable((f"{vocab_sizes[name]:,}", "") for name in baselines)])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    # text names left-aligned, numbers right-aligned
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:],
                                                                                           strict=True))]).rstrip()
                     for row in (header, *rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat-tok-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory of shard_NNNNN.parquet files; the last is the validation shard "
                             "(default: the dataset, else the embedded corpus)")
    parser.add_argument("--max-docs", type=int, default=DEFAULT_MAX_DOCS,
                        help="documents of the validation shard to encode")
    parser.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES), metavar="ENCODING",
                        help="tiktoken encodings to compare with (none: only ours)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.max_docs < 1:
        raise cli.UsageError(f"--max-docs must be positive, got {args.max_docs}")
    unknown = sorted(set(args.baselines) - set(tiktoken.list_encoding_names()))
    if unknown:
        raise cli.UsageError(f"--baselines: unknown tiktoken encoding(s) {', '.join(unknown)}; known: "
                             f"{', '.join(tiktoken.list_encoding_names())}")


def _run(args: argparse.Namespace) -> None:
    _check_args(args)
    start = time.perf_counter()
    directory = args.tokenizer_dir or tokenizer_dir()
    tokenizer = Tokenizer.load(directory)  # its error says how to train one
    val_shard = list_parquet_files(args.data_dir)[-1]
    baselines, skipped = load_baselines(args.baselines)
    if skipped:
        reasons = ", ".join(dict.fromkeys(skipped.values()))
        print(f"note: skipping {', '.join(skipped)}: tiktoken could not load them ({reasons}; offline? it downloads "
              "them once into its cache, TIKTOKEN_CACHE_DIR)")
    result = evaluate_compression(tokenizer, val_shard, load_genres(), baselines, args.max_docs)
    print(f"bytes per token (higher is better) of {directory}\non {val_shard} (first {args.max_docs:,} documents) "
          "and the genre samples")
    if baselines:
        print('"vs X": how many fewer tokens ours needs than X for the same text (negative: more)')
    print()
    print(format_table(result))
    path = report.append_section(REPORT_STAGE, {
        "tokenizer_dir": str(directory), "val_shard": str(val_shard), "max_docs": args.max_docs, **result,
        "skipped_baselines": sorted(skipped), "wall_time_s": time.perf_counter() - start})
    print(f"\nrecorded in {path}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.run_job(lambda: _run(args))


if __name__ == "__main__":
    main()
