"""Benchmark the Rust data plane against a loader written the way reference nanochat's works.

Baseline: pyarrow row groups -> `tiktoken` `encode_ordinary_batch` (same ranks, BOS prepended) ->
a Python list-scan best-fit into a torch row buffer (buffer_size 1000). Ours:
`nanochat_rs.dataloader.tokenizing_data_loader` (Rust encoder from Arrow buffers + Rust packer).

(a) packer only: documents pre-tokenized for both, rows/s, rows asserted identical;
(b) end to end: tokens/s from parquet to a filled batch, crop fraction (asserted equal);
each variant runs in its own subprocess so its peak RSS can be reported.

    python scripts/bench_dataloader.py [--data-dir DIR] [--tokenizer-dir DIR] [-B 32] [-T 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from nanochat_rs.dataloader import split_files, tokenizing_data_loader
from nanochat_rs.packer import BestFitPacker
from nanochat_rs.tokenizer import Tokenizer

# ---- the baseline: how reference nanochat's loader does it ------------------------------------------


class BaselinePacker:
    """List-scan best fit into a torch row buffer: top up, longest fitting else crop the shortest."""

    def __init__(self, docs: Iterator[list[int]], B: int, T: int, buffer_size: int) -> None:
        self.docs, self.B, self.C, self.buffer_size = docs, B, T + 1, buffer_size
        self.buffer: list[list[int]] = []
        self.row_buffer = torch.empty((B, self.C), dtype=torch.long)
        self.placed = self.cropped = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        for r in range(self.B):
            pos = 0
            while pos < self.C:
                while len(self.buffer) < self.buffer_size:
                    self.buffer.append(next(self.docs))
                remaining = self.C - pos
                best, best_len = -1, 0
                for i, doc in enumerate(self.buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best < 0:
                    best = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i]))
                doc = self.buffer.pop(best)
                n = min(len(doc), remaining)
                self.row_buffer[r, pos:pos + n] = torch.tensor(doc[:n], dtype=torch.long)
                self.placed += n
                self.cropped += len(doc) - n
                pos += n
        return self.row_buffer[:, :-1], self.row_buffer[:, 1:]


def baseline_documents(files: list[Path], tokenizer: Tokenizer, rows_per_call: int = 128) -> Iterator[list[int]]:
    encoding, bos = tokenizer.to_tiktoken(), tokenizer.bos_token_id
    while True:  # epochs
        for path in files:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
                for i in range(0, len(texts), rows_per_call):
                    for ids in encoding.encode_ordinary_batch(texts[i:i + rows_per_call]):
                        yield [bos] + ids


# ---- child processes ------------------------------------------------------------------------------


class Digest:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, inputs: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> None:
        for x in (inputs, targets):
            array = x.contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x)
            self.h.update(array.tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def cyclic_docs(tokens: np.ndarray, offsets: np.ndarray) -> Iterator[list[int]]:
    docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    while True:
        yield from docs


def packer_baseline(args: argparse.Namespace) -> dict:
    tokens, offsets = np.load(args.tokens), np.load(args.offsets)
    packer = BaselinePacker(cyclic_docs(tokens, offsets), args.B, args.T, args.buffer_size)
    digest, elapsed = Digest(), 0.0
    for _ in range(args.batches):
        t0 = time.perf_counter()
        inputs, targets = packer.next_batch()
        elapsed += time.perf_counter() - t0
        digest.add(inputs, targets)
    return {"rows_per_s": args.batches * args.B / elapsed, "digest": digest.hexdigest()}


def packer_ours(args: argparse.Namespace) -> dict:
    tokens, offsets = np.load(args.tokens), np.load(args.offsets)
    packer = BestFitPacker(args.T, buffer_size=args.buffer_size, bos_token_id=int(tokens[0]))
    chunk = 256
    starts = list(range(0, len(offsets) - 1, chunk))
    chunks = [(tokens[offsets[s]:offsets[min(s + chunk, len(offsets) - 1)]],
               offsets[s:min(s + chunk, len(offsets) - 1) + 1] - offsets[s]) for s in starts]
    next_chunk = itertools.cycle(chunks)  # epoch after epoch
    inputs, targets = np.empty((args.B, args.T), np.int64), np.empty((args.B, args.T), np.int64)
    digest, elapsed = Digest(), 0.0
    for b in range(args.batches):
        t0 = time.perf_counter()
        while packer.stats["docs_pending"] + packer.stats["docs_buffered"] < args.buffer_size:
            packer.push(*next(next_chunk))
        while not packer.pack_into(inputs, targets):
            packer.push(*next(next_chunk))
        elapsed += time.perf_counter() - t0
        if b < args.check_batches:
            digest.add(inputs, targets)
    return {"rows_per_s": args.batches * args.B / elapsed, "digest": digest.hexdigest()}


def e2e_baseline(args: argparse.Namespace) -> dict:
    tokenizer = Tokenizer.load(args.tokenizer_dir)
    t0 = time.perf_counter()
    docs = baseline_documents(split_files("train", args.data_dir), tokenizer)
    packer = BaselinePacker(docs, args.B, args.T, args.buffer_size)
    digest = Digest()
    for _ in range(args.batches):
        inputs, targets = packer.next_batch()
        inputs, targets = inputs.clone(), targets.clone()  # a batch must survive the next one
        digest.add(inputs, targets)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": args.batches * args.B * args.T / elapsed, "digest": digest.hexdigest(),
            "crop_fraction": packer.cropped / (packer.placed + packer.cropped)}


def e2e_ours(args: argparse.Namespace) -> dict:
    tokenizer = Tokenizer.load(args.tokenizer_dir)
    t0 = time.perf_counter()
    loader = tokenizing_data_loader(tokenizer, args.B, args.T, "train", data_dir=args.data_dir,
                                    buffer_size=args.buffer_size)
    digest = Digest()
    for _ in range(args.batches):
        inputs, targets, state = next(loader)
        digest.add(inputs, targets)
    elapsed = time.perf_counter() - t0
    loader.close()
    stats = state["packer"]["stats"]
    return {"tokens_per_s": args.batches * args.B * args.T / elapsed, "digest": digest.hexdigest(),
            "crop_fraction": stats["tokens_cropped"] / (stats["tokens_placed"] + stats["tokens_cropped"]),
            "state_json_mb": len(json.dumps(state)) / 1e6}


CHILDREN = {"packer-baseline": packer_baseline, "packer-ours": packer_ours,
            "e2e-baseline": e2e_baseline, "e2e-ours": e2e_ours}


def run_child(mode: str, args: argparse.Namespace, **extra: object) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "-B", str(args.B), "-T", str(args.T),
            "--buffer-size", str(args.buffer_size), "--data-dir", str(args.data_dir),
            "--tokenizer-dir", str(args.tokenizer_dir)]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- parent --------------------------------------------------------------------------------------


def prepare_tokenizer(args: argparse.Namespace, workdir: Path) -> Path:
    if args.tokenizer_dir:
        return Path(args.tokenizer_dir)
    first = split_files("train", args.data_dir)[0]
    print(f"training a {args.vocab_size}-token tokenizer on {args.train_chars:,} chars of {first.name} ...")
    texts = pq.read_table(first, columns=["text"]).column("text")
    tokenizer = Tokenizer.train(texts, args.vocab_size, max_chars=args.train_chars)
    return tokenizer.save(workdir / "tokenizer")


def pretokenize(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    tokenizer = Tokenizer.load(args.tokenizer_dir)
    parts = [pq.read_table(f, columns=["text"]).column("text") for f in split_files("train", args.data_dir)]
    encoded = [tokenizer.encode_arrow(p, prepend=tokenizer.bos_token_id) for p in parts]
    tokens = np.concatenate([t for t, _ in encoded])
    bases = np.cumsum([0] + [len(t) for t, _ in encoded[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [o[1:] + base for (_, o), base in zip(encoded, bases,
                                                                                              strict=True)])
    paths = workdir / "tokens.npy", workdir / "offsets.npy"
    np.save(paths[0], tokens)
    np.save(paths[1], offsets)
    print(f"pre-tokenized {len(offsets) - 1:,} documents, {len(tokens):,} tokens")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None,
                        help="parquet shards (default: NANOCHAT_DATA_DIR, else the embedded corpus)")
    parser.add_argument("--tokenizer-dir", default=None, help="a saved tokenizer (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--train-chars", type=int, default=3_000_000)
    parser.add_argument("-B", type=int, default=32)
    parser.add_argument("-T", type=int, default=2048)
    parser.add_argument("--buffer-size", type=int, default=1000)
    parser.add_argument("--baseline-batches", type=int, default=10, help="(a) batches packed by the baseline")
    parser.add_argument("--ours-batches", type=int, default=1000, help="(a) batches packed by ours")
    parser.add_argument("--e2e-batches", type=int, default=30, help="(b) batches for both")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--offsets", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--check-batches", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args.tokenizer_dir = prepare_tokenizer(args, workdir)
        tokens, offsets = pretokenize(args, workdir)
        print(f"B={args.B} T={args.T} buffer_size={args.buffer_size}")

        base = run_child("packer-baseline", args, tokens=tokens, offsets=offsets, batches=args.baseline_batches)
        ours = run_child("packer-ours", args, tokens=tokens, offsets=offsets, batches=args.ours_batches,
                         check_batches=args.baseline_batches)
        assert ours["digest"] == base["digest"], "packer-only rows differ between baseline and ours"
        print(f"(a) packer only : baseline {base['rows_per_s']:10,.0f} rows/s | ours {ours['rows_per_s']:10,.0f} "
              f"rows/s | x{ours['rows_per_s'] / base['rows_per_s']:.1f} (target >= 50) | rows identical")
        print(f"    peak RSS    : baseline {base['peak_rss_mb']:.0f} MB | ours {ours['peak_rss_mb']:.0f} MB")

        base = run_child("e2e-baseline", args, batches=args.e2e_batches)
        ours = run_child("e2e-ours", args, batches=args.e2e_batches)
        assert ours["digest"] == base["digest"], "end-to-end batches differ between baseline and ours"
        assert ours["crop_fraction"] == base["crop_fraction"]
        print(f"(b) end to end  : baseline {base['tokens_per_s']:10,.0f} tok/s  | ours {ours['tokens_per_s']:10,.0f} "
              f"tok/s  | x{ours['tokens_per_s'] / base['tokens_per_s']:.1f} (target >= 2) | batches identical")
        print(f"    crop frac.  : baseline {base['crop_fraction']:.4f} | ours {ours['crop_fraction']:.4f}")
        print(f"    peak RSS    : baseline {base['peak_rss_mb']:.0f} MB | ours {ours['peak_rss_mb']:.0f} MB")
        print(f"    loader state: {ours['state_json_mb']:.1f} MB as JSON")


if __name__ == "__main__":
    main()
