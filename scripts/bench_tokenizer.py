"""Tokenizer benchmark: training (ours vs rustbpe vs HuggingFace tokenizers) and encoding (ours vs tiktoken).

Each trainer runs in its own subprocess on the same documents (Python str, read from the parquet
shards and repeated --repeat times), so peak RSS is per trainer. Prints seconds, MB/s, bytes/token on
the validation shard and our speed as a ratio to each peer, and checks that our merges equal rustbpe's.

    python scripts/bench_tokenizer.py --data-dir ../shared/data/devcorpus --repeat 6 --vocab-size 32768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from nanochat_rs.tokenizer import DEFAULT_PATTERN, SPECIAL_TOKENS, Tokenizer


def shards(data_dir: Path) -> tuple[list[Path], Path]:
    files = sorted(data_dir.glob("shard_*.parquet"))
    if len(files) < 2:
        raise SystemExit(f"need at least two shards in {data_dir} (the last is validation)")
    return files[:-1], files[-1]


def load_texts(files: list[Path], repeat: int) -> list[str]:
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t]
    return texts * repeat


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bytes_per_token(encode_batch, val_texts: list[str]) -> float:
    n_tokens = sum(len(ids) for ids in encode_batch(val_texts))
    return sum(len(t.encode()) for t in val_texts) / n_tokens


def run_worker(args: argparse.Namespace) -> None:
    """Train one tokenizer in this process and print a JSON line with the measurements."""
    train_files, val_file = shards(args.data_dir)
    texts = load_texts(train_files, args.repeat)
    val_texts = load_texts([val_file], 1)
    rss_loaded = peak_rss_mb()
    n_bytes = sum(len(t.encode()) for t in texts)
    result: dict[str, object] = {"name": args.worker, "mb": n_bytes / 1e6}
    start = time.perf_counter()
    if args.worker == "ours":
        tok = Tokenizer.train(texts, args.vocab_size)
        result["seconds"] = time.perf_counter() - start
        ranks = tok.mergeable_ranks()
        result["bytes_per_token"] = bytes_per_token(tok.encode, val_texts)
    elif args.worker == "rustbpe":
        import rustbpe

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), args.vocab_size - len(SPECIAL_TOKENS), pattern=DEFAULT_PATTERN)
        result["seconds"] = time.perf_counter() - start
        ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        enc = Tokenizer(sorted(ranks, key=ranks.__getitem__))
        result["bytes_per_token"] = bytes_per_token(enc.encode, val_texts)
    elif args.worker == "hf":
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.BPE(byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(DEFAULT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=list(SPECIAL_TOKENS))
        tok.train_from_iterator(texts, trainer)
        result["seconds"] = time.perf_counter() - start
        ranks = None
        result["bytes_per_token"] = bytes_per_token(
            lambda batch: [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)], val_texts)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    result["rss_loaded_mb"] = rss_loaded
    result["rss_peak_mb"] = peak_rss_mb()
    if ranks is not None:
        with open(args.ranks_out, "w") as f:
            json.dump(sorted((k.hex(), v) for k, v in ranks.items()), f)
    print(json.dumps(result))


def train_in_subprocess(name: str, args: argparse.Namespace, ranks_out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--data-dir", str(args.data_dir),
           "--repeat", str(args.repeat), "--vocab-size", str(args.vocab_size), "--ranks-out", str(ranks_out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} trainer failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_encode(args: argparse.Namespace) -> None:
    train_files, val_file = shards(args.data_dir)
    tok = Tokenizer.train(load_texts(train_files[:1], 1), args.vocab_size)
    enc = tok.to_tiktoken()
    texts = load_texts([val_file], args.encode_repeat)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"\n== encoding {mb:.1f} MB ({len(texts)} documents), {args.threads} threads ==")

    def best_of(fn, reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours_ids = tok.encode(texts, num_threads=args.threads)
    theirs_ids = enc.encode_ordinary_batch(texts, num_threads=args.threads)
    print(f"identical ids to tiktoken: {ours_ids == theirs_ids}")
    t_tik = best_of(lambda: enc.encode_ordinary_batch(texts, num_threads=args.threads))
    t_ours = best_of(lambda: tok.encode(texts, num_threads=args.threads))
    t_flat = best_of(lambda: tok.encode_flat(texts, num_threads=args.threads))
    arrow = pa.array(texts)
    print(f"{'tiktoken encode_ordinary_batch':<34} {t_tik:7.3f} s  {mb / t_tik:7.1f} MB/s")
    print(f"{'ours encode(list)':<34} {t_ours:7.3f} s  {mb / t_ours:7.1f} MB/s   ratio {t_tik / t_ours:.2f}x")
    print(f"{'ours encode_flat (numpy out)':<34} {t_flat:7.3f} s  {mb / t_flat:7.1f} MB/s   "
          f"ratio {t_tik / t_flat:.2f}x")
    t_arrow = best_of(lambda: tok.encode_arrow(arrow, num_threads=args.threads))
    print(f"{'ours encode_arrow (zero-copy in)':<34} {t_arrow:7.3f} s  {mb / t_arrow:7.1f} MB/s   "
          f"ratio {t_tik / t_arrow:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="directory of parquet shards (text column)")
    parser.add_argument("--repeat", type=int, default=6, help="repeat the training documents N times")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--peers", default="rustbpe,hf", help="comma-separated: rustbpe,hf")
    parser.add_argument("--threads", type=int, default=2, help="encoding threads for both encoders")
    parser.add_argument("--encode-repeat", type=int, default=4)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for name in ["ours", *[p for p in args.peers.split(",") if p]]:
                results[name] = train_in_subprocess(name, args, Path(tmp) / f"{name}.json")
            ours = results["ours"]
            print(f"== training, vocab {args.vocab_size:,}, {ours['mb']:.1f} MB of text ==")
            print(f"{'trainer':<10} {'seconds':>8} {'MB/s':>8} {'bytes/tok':>10} {'peak RSS MB':>12} "
                  f"{'(after load)':>12} {'ours/peer':>10}")
            for name, r in results.items():
                ratio = "" if name == "ours" else f"{r['seconds'] / ours['seconds']:.2f}x"
                print(f"{name:<10} {r['seconds']:8.2f} {r['mb'] / r['seconds']:8.1f} {r['bytes_per_token']:10.3f} "
                      f"{r['rss_peak_mb']:12.0f} {r['rss_loaded_mb']:12.0f} {ratio:>10}")
            if "rustbpe" in results:
                same = (Path(tmp) / "ours.json").read_text() == (Path(tmp) / "rustbpe.json").read_text()
                print(f"identical merges to rustbpe: {same}")
    bench_encode(args)


if __name__ == "__main__":
    main()
