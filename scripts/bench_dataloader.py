"""Benchmark the Rust data plane against a loader written the way reference nanochat's works.

Baseline: pyarrow row groups -> `tiktoken` `encode_ordinary_batch` (same ranks, BOS prepended) ->
a Python list-scan best-fit into a torch row buffer (buffer_size 1000). Ours:
`nanochat_rs.dataloader.tokenizing_data_loader` (Rust encoder from Arrow buffers + Rust packer).

(a) packer only: documents pre-tokenized for both, rows/s, rows asserted identical;
(b) end to end: tokens/s from parquet to a filled batch, crop fraction (asserted equal);
each variant runs in its own subprocess so its peak RSS can be reported.

--sft (one process): conversation packing in pad mode. Documents of the corpus are split into
alternating user/assistant turns and rendered with their training masks; the Rust packer
(`mode="pad"`, buffer SFT_BUFFER_SIZE) races a straightforward Python best-fit-pad loop on them,
rows (inputs and targets) asserted identical; prints rows/s of each (from the median CPU time per batch)
and the fraction of padding.

    python scripts/bench_dataloader.py [--data-dir DIR] [--tokenizer-dir DIR] [-B 32] [-T 2048] [--sft]
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
from nanochat_rs.conversation import render_conversation
from nanochat_rs.dataloader import split_files, tokenizing_data_loader
from nanochat_rs.dataset import embedded_corpus_dir
from nanochat_rs.packer import SFT_BUFFER_SIZE, BestFitPacker
from nanochat_rs.tok_train import load_or_train_tokenizer
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


# ---- SFT: pad mode on conversations (one process) ---------------------------------------------------


class BaselinePadPacker:
    """Best fit with padding, the obvious way: a Python list buffer, a linear scan for the longest
    conversation that fits, padding when none does (an empty row crops the shortest instead)."""

    def __init__(self, convs: Iterator[tuple[list[int], list[int]]], B: int, T: int, buffer_size: int,
                 bos: int) -> None:
        self.convs, self.B, self.C, self.buffer_size, self.bos = convs, B, T + 1, buffer_size, bos
        self.buffer: list[tuple[list[int], list[int]]] = []
        self.padded = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for _ in range(self.B):
            row: list[int] = []
            mask: list[int] = []
            while len(row) < self.C:
                while len(self.buffer) < self.buffer_size:
                    self.buffer.append(next(self.convs))
                remaining = self.C - len(row)
                best, best_len = -1, 0
                for i, (ids, _) in enumerate(self.buffer):
                    if best_len < len(ids) <= remaining:
                        best, best_len = i, len(ids)
                if best < 0 and row:
                    break
                if best < 0:
                    best = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i][0]))
                ids, m = self.buffer.pop(best)
                row += ids[:remaining]
                mask += m[:remaining]
            self.padded += self.C - len(row)
            masks.append(mask + [0] * (self.C - len(row)))
            rows.append(row + [self.bos] * (self.C - len(row)))
        batch, supervised = torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)
        targets = batch[:, 1:].masked_fill(~supervised[:, 1:], -1)
        return batch[:, :-1], targets


TURN_CHARS = 400


def conversations(files: list[Path], tokenizer: Tokenizer, max_docs: int, max_tokens: int
                  ) -> list[tuple[list[int], list[int]]]:
    """Corpus documents as conversations: paragraphs, merged up to `TURN_CHARS` characters, become
    alternating user/assistant turns, 2, 4 or 6 per conversation (a long document gives several), so
    lengths vary as chat data does (a few hundred tokens, some past a row)."""
    out = []
    docs = (text for path in files for text in pq.read_table(path, columns=["text"]).column("text").to_pylist())
    for text in itertools.islice(docs, max_docs):
        turns: list[str] = []
        for paragraph in (p.strip() for p in text.split("\n")):
            if turns and len(turns[-1]) < TURN_CHARS:
                turns[-1] += "\n" + paragraph
            elif paragraph:
                turns.append(paragraph)
        if len(turns) < 2:  # one paragraph: a question and an answer of half of it each
            words = text.split()
            turns = [" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
        start = 0
        while start + 2 <= len(turns):
            n = min(2 + 2 * (len(out) % 3), (len(turns) - start) // 2 * 2)  # end on an assistant turn
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns[start:start + n])]
            out.append(render_conversation(tokenizer, messages, max_tokens))
            start += n
    return out


def sft_bench(args: argparse.Namespace) -> None:
    tokenizer = load_or_train_tokenizer(args.tokenizer_dir)
    data_dir = args.data_dir if args.data_dir is not None else embedded_corpus_dir()
    convs = conversations(split_files("train", data_dir), tokenizer, args.sft_docs, args.T)
    bos, B, T = tokenizer.bos_token_id, args.B, args.T
    print(f"{len(convs):,} conversations, {sum(len(ids) for ids, _ in convs):,} tokens "
          f"({np.mean([np.mean(m) for _, m in convs]):.2f} supervised); B={B} T={T} buffer_size={SFT_BUFFER_SIZE}")

    # Rates come from the median CPU time of this thread per batch: this runs in one process, often
    # on a busy machine. The median shrugs off our short batches that another process interrupted,
    # but hardly any of the baseline's long ones escape that; CPU time charges neither for the wait.
    baseline = BaselinePadPacker(itertools.cycle(convs), B, T, SFT_BUFFER_SIZE, bos)
    expected, times = [], []
    for _ in range(args.baseline_batches):
        t0 = time.thread_time()
        expected.append(baseline.next_batch())
        times.append(time.thread_time() - t0)
    base_rows_per_s = B / float(np.median(times))

    # The same stream for ours, pushed zero-copy in chunks of flat tokens + offsets + masks.
    chunk = 64
    pieces = []
    for start in range(0, len(convs), chunk):
        group = convs[start:start + chunk]
        offsets = np.zeros(len(group) + 1, np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in group])
        pieces.append((np.array([t for ids, _ in group for t in ids], np.uint32), offsets,
                       np.array([m for _, mask in group for m in mask], np.uint8)))
    next_piece = itertools.cycle(pieces)
    packer = BestFitPacker(T, buffer_size=SFT_BUFFER_SIZE, bos_token_id=bos, mode="pad")
    inputs, targets = torch.empty((B, T), dtype=torch.long), torch.empty((B, T), dtype=torch.long)
    times = []
    for b in range(args.ours_batches):
        t0 = time.thread_time()
        # Push a batch's worth ahead: a pack_into that runs dry rolls back and is redone.
        while packer.stats["tokens_pending"] < B * (T + 1):
            packer.push(*next(next_piece))
        while not packer.pack_into(inputs, targets):
            packer.push(*next(next_piece))
        times.append(time.thread_time() - t0)
        if b < len(expected):
            assert torch.equal(inputs, expected[b][0]) and torch.equal(targets, expected[b][1]), \
                f"batch {b} differs between baseline and ours"
        if b + 1 == len(expected):
            assert packer.stats["tokens_padded"] == baseline.padded, "padding counts differ"
    ours_rows_per_s = B / float(np.median(times))
    padding = packer.stats["tokens_padded"] / (packer.stats["rows_packed"] * (T + 1))
    print(f"(sft) pad packing: baseline {base_rows_per_s:10,.0f} rows/s | ours {ours_rows_per_s:10,.0f} rows/s "
          f"| x{ours_rows_per_s / base_rows_per_s:.1f} (target >= 50) | rows identical")
    print(f"      padding    : {padding:.4f} of row positions over {args.ours_batches} batches "
          f"(equal to the baseline's over its {args.baseline_batches})")


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
    parser.add_argument("--sft", action="store_true", help="conversation packing (pad mode) instead")
    parser.add_argument("--sft-docs", type=int, default=1000, help="--sft: corpus documents to render")
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
    if args.sft:
        sft_bench(args)
        return
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
