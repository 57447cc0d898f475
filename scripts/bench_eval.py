"""CORE evaluation speed: batched scoring (`core_eval.score_task`) vs the one-item-per-forward loop of the
same math (`core_eval.score_task_reference`, how nanochat runs it), same model, one process.

    python scripts/bench_eval.py                              # synthetic bundle, random depth-4 GPT
    python scripts/bench_eval.py --items 1000 --depth 6 --sequence-len 512
    python scripts/bench_eval.py --bundle ~/.cache/nanochat_rs/eval_bundle --max-per-task 50

The synthetic bundle (written to a temporary directory) has the CORE task shapes: 0-shot and few-shot
multiple choice with 4 choices, 2-option schema items, and language-modelling items with short
continuations, all cut from the text of the embedded corpus. Random init is fine: speed does not depend
on the weights. Reports seconds per 1,000 items for each path, their ratio, and how many items the two
paths judged differently (0 expected in fp32; bf16 rounding can flip a near tie).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from nanochat_rs.common import autodetect_device_type, compute_cleanup, compute_init
from nanochat_rs.core_eval import CoreTask, load_bundle, score_task, score_task_reference
from nanochat_rs.dataset import embedded_corpus_dir
from nanochat_rs.gpt import build_model, config_for_depth
from nanochat_rs.tok_train import load_or_train_tokenizer
from nanochat_rs.tokenizer import Tokenizer

# (label, type, num_fewshot, random baseline %): one of each shape CORE mixes
SYNTHETIC_TASKS = (
    ("mc_0shot", "multiple_choice", 0, 25.0),
    ("mc_3shot", "multiple_choice", 3, 25.0),
    ("schema_0shot", "schema", 0, 50.0),
    ("lm_0shot", "language_modeling", 0, 0.0),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="a real bundle directory (default: synthetic)")
    parser.add_argument("--items", type=int, default=100, help="synthetic items, spread over the tasks")
    parser.add_argument("--max-per-task", type=int, default=None, help="with --bundle: items per task")
    parser.add_argument("--depth", type=int, default=4, help="random-init model depth (model_dim = 64 * depth)")
    parser.add_argument("--sequence-len", type=int, default=256, help="model context; longer prompts are cropped")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward (default: "
                                                                       "core_eval.DEFAULT_BATCH_TOKENS)")
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    args = parser.parse_args()
    if args.items < len(SYNTHETIC_TASKS) or args.depth < 1 or args.sequence_len < 16:
        parser.error(f"need --items >= {len(SYNTHETIC_TASKS)}, --depth >= 1 and --sequence-len >= 16")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        parser.error("--batch-tokens must be >= 1")
    return args


def corpus_words(limit: int = 200_000) -> list[str]:
    words: list[str] = []
    for shard in sorted(embedded_corpus_dir().glob("shard_*.parquet")):
        for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
            words.extend(text.split())
            if len(words) >= limit:
                return words
    return words


def synthetic_item(task_type: str, rng: random.Random, words: list[str]) -> dict[str, object]:
    def phrase(low: int, high: int) -> str:
        start = rng.randrange(len(words) - high)
        return " ".join(words[start:start + rng.randint(low, high)])

    if task_type == "multiple_choice":
        return {"query": phrase(15, 50), "choices": [phrase(4, 14) for _ in range(4)], "gold": rng.randrange(4)}
    if task_type == "schema":
        return {"context_options": [phrase(8, 25) for _ in range(2)], "continuation": phrase(4, 10),
                "gold": rng.randrange(2)}
    return {"context": phrase(20, 60), "continuation": phrase(1, 3)}


def write_synthetic_bundle(root: Path, num_items: int) -> Path:
    """A bundle in the DCLM layout with `num_items` items spread over SYNTHETIC_TASKS."""
    rng, words = random.Random(0), corpus_words()
    config = ["icl_tasks:"]
    baselines = ["Eval Task,Random baseline"]
    for n, (label, task_type, shots, baseline) in enumerate(SYNTHETIC_TASKS):
        count = num_items // len(SYNTHETIC_TASKS) + (n < num_items % len(SYNTHETIC_TASKS))
        data = root / "eval_data" / f"{label}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(synthetic_item(task_type, rng, words)) + "\n" for _ in range(count)))
        config += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                   f"  icl_task_type: {task_type}"]
        baselines.append(f"{label},{baseline}")
    (root / "core.yaml").write_text("\n".join(config) + "\n")
    (root / "eval_meta_data.csv").write_text("\n".join(baselines) + "\n")
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(device: torch.device, run: Callable[[], dict[int, bool]]) -> tuple[float, dict[int, bool]]:
    sync(device)
    start = time.perf_counter()
    result = run()
    sync(device)
    return time.perf_counter() - start, result


def bench(tasks: list[CoreTask], model: torch.nn.Module, tokenizer: Tokenizer, device: torch.device,
          batch_tokens: int | None) -> None:
    batched_kwargs = {} if batch_tokens is None else {"batch_tokens": batch_tokens}
    warmup = CoreTask(**{**tasks[0].__dict__, "items": tasks[0].items[:8]})
    score_task(model, tokenizer, warmup, **batched_kwargs)  # kernels, allocator, thread pools
    score_task_reference(model, tokenizer, warmup)
    print(f"{'task':>16} {'items':>6} {'batched s':>10} {'one-by-one s':>13} {'ratio':>7} {'disagree':>9}")
    total_items, total_batched, total_reference, total_disagree = 0, 0.0, 0.0, 0
    for task in tasks:
        batched_s, batched = timed(device, lambda t=task: score_task(model, tokenizer, t, **batched_kwargs))
        reference_s, reference = timed(device, lambda t=task: score_task_reference(model, tokenizer, t))
        disagree = sum(batched[i] != reference[i] for i in reference)
        total_items += len(task.items)
        total_batched += batched_s
        total_reference += reference_s
        total_disagree += disagree
        print(f"{task.label:>16} {len(task.items):6d} {batched_s:10.2f} {reference_s:13.2f} "
              f"{reference_s / batched_s:6.2f}x {disagree:9d}")
    per_1000 = 1000 / total_items
    print(f"\nper 1,000 items: batched {total_batched * per_1000:.2f} s, one item at a time "
          f"{total_reference * per_1000:.2f} s -> {total_reference / total_batched:.2f}x faster; "
          f"{total_disagree} of {total_items} items judged differently")


def main() -> None:
    args = parse_args()
    _, device = compute_init(args.device_type or autodetect_device_type())
    tokenizer = load_or_train_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.sequence_len)
    model = build_model(config, device).eval()
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as scratch:
        bundle = args.bundle if args.bundle is not None else write_synthetic_bundle(Path(scratch), args.items)
        tasks = load_bundle(bundle, max_per_task=args.max_per_task if args.bundle is not None else None)
        source = args.bundle or "a synthetic bundle"
        print(f"device {device}, torch threads {torch.get_num_threads()}, model: n_layer={config.n_layer} "
              f"n_embd={config.n_embd} sequence_len={config.sequence_len} vocab={config.vocab_size}; "
              f"{sum(len(t.items) for t in tasks)} items in {len(tasks)} tasks from {source}")
        bench(tasks, model, tokenizer, device, args.batch_tokens)
    compute_cleanup()


if __name__ == "__main__":
    main()
