"""CORE evaluation speed: batched scoring (`core_eval.score_task`) vs the one-item-per-forward loop of the
same math (`core_eval.score_task_reference`, how nanochat runs it), same model, one process.

    python scripts/bench_eval.py                              # CORE-shaped synthetic bundle, context 2048
    python scripts/bench_eval.py --sequence-len 256           # the cpu preset's context: prompts cropped
    python scripts/bench_eval.py --bundle ~/.cache/nanochat_rs/eval_bundle --max-per-task 50

The synthetic bundle (written to a temporary directory) has the 22 tasks of CORE with their real shapes:
task type, number of few-shot examples, number of choices, continuation delimiter and typical lengths in
words (a HellaSwag context of 30-50 words and endings of 10-25, a SQuAD passage of 100-160 words, and so
on), all cut from the text of the embedded corpus. Random init is fine: speed does not depend on the
weights. The model has the `cpu` preset's shape at `--sequence-len` (default: the speedrun's 2048, the
context CORE is reported at). Reports seconds per 1,000 items for each path, their ratio, and how many
items the two paths judged differently (0 expected in fp32; bf16 rounding can flip a near tie).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq
import torch
from nanochat_rs.common import autodetect_device_type, compute_cleanup, compute_init
from nanochat_rs.core_eval import CoreTask, load_bundle, score_task, score_task_reference
from nanochat_rs.dataset import embedded_corpus_dir
from nanochat_rs.gpt import build_model, config_for_depth
from nanochat_rs.recipe import PRESETS, SEQUENCE_LEN
from nanochat_rs.tok_train import load_or_train_tokenizer
from nanochat_rs.tokenizer import Tokenizer


class TaskShape(NamedTuple):
    label: str
    task_type: str
    num_fewshot: int
    random_baseline: float  # percent
    choices: int  # multiple_choice choices or schema context options; 1 for language_modeling
    context_words: tuple[int, int]  # query / context option / context
    answer_words: tuple[int, int]  # choice / shared continuation / continuation
    delimiter: str = " "
    fixed_choices: tuple[str, ...] = ()  # the same choices in every item (BoolQ's "no"/"yes")


ANSWER = "\nAnswer: "
# DCLM's CORE task list (core.yaml), with lengths in words typical of each dataset
CORE_SHAPES = (
    TaskShape("hellaswag_zeroshot", "multiple_choice", 0, 25.0, 4, (30, 50), (10, 25)),
    TaskShape("jeopardy", "language_modeling", 10, 0.0, 1, (15, 35), (1, 3), ANSWER),
    TaskShape("bigbench_qa_wikidata", "language_modeling", 10, 0.0, 1, (5, 12), (1, 3)),
    TaskShape("arc_easy", "multiple_choice", 10, 25.0, 4, (12, 35), (1, 8), ANSWER),
    TaskShape("arc_challenge", "multiple_choice", 10, 25.0, 4, (15, 40), (1, 10), ANSWER),
    TaskShape("copa", "multiple_choice", 0, 50.0, 2, (8, 14), (4, 8)),
    TaskShape("commonsense_qa", "multiple_choice", 10, 20.0, 5, (8, 20), (1, 3), ANSWER),
    TaskShape("piqa", "multiple_choice", 10, 50.0, 2, (5, 15), (5, 35), ANSWER),
    TaskShape("openbook_qa", "multiple_choice", 0, 25.0, 4, (6, 20), (1, 8)),
    TaskShape("lambada_openai", "language_modeling", 0, 0.0, 1, (50, 100), (1, 1)),
    TaskShape("hellaswag", "multiple_choice", 10, 25.0, 4, (30, 50), (10, 25)),
    TaskShape("winograd", "schema", 0, 50.0, 2, (5, 15), (3, 10)),
    TaskShape("winogrande", "schema", 0, 50.0, 2, (10, 20), (3, 10)),
    TaskShape("bigbench_dyck_languages", "language_modeling", 10, 0.0, 1, (10, 40), (1, 6)),
    TaskShape("agi_eval_lsat_ar", "multiple_choice", 3, 25.0, 5, (150, 250), (5, 20)),
    TaskShape("bigbench_cs_algorithms", "language_modeling", 10, 0.0, 1, (10, 40), (1, 1)),
    TaskShape("bigbench_operators", "language_modeling", 10, 0.0, 1, (8, 20), (1, 2)),
    TaskShape("bigbench_repeat_copy_logic", "language_modeling", 10, 0.0, 1, (10, 25), (8, 25)),
    TaskShape("squad", "language_modeling", 10, 0.0, 1, (100, 160), (1, 4)),
    TaskShape("coqa", "language_modeling", 0, 0.0, 1, (200, 320), (1, 4)),
    TaskShape("boolq", "multiple_choice", 10, 62.0, 2, (80, 140), (1, 1), ANSWER, ("no", "yes")),
    TaskShape("bigbench_language_identification", "multiple_choice", 10, 25.0, 11, (10, 25), (1, 2)),
)
MIN_ITEMS_PER_TASK = max(shape.num_fewshot for shape in CORE_SHAPES) + 1  # every item gets all its examples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="a real bundle directory (default: synthetic)")
    parser.add_argument("--items-per-task", type=int, default=12, help="synthetic items of each of the 22 tasks")
    parser.add_argument("--max-per-task", type=int, default=None, help="with --bundle: items per task")
    parser.add_argument("--depth", type=int, default=PRESETS["cpu"]["depth"], help="random-init model depth")
    parser.add_argument("--sequence-len", type=int, default=SEQUENCE_LEN,
                        help="model context; longer prompts are cropped on the left")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward (default: "
                                                                       "core_eval.DEFAULT_BATCH_TOKENS)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path per task; the best counts")
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    args = parser.parse_args()
    if args.items_per_task < MIN_ITEMS_PER_TASK or args.depth < 1 or args.sequence_len < 16:
        parser.error(f"need --items-per-task >= {MIN_ITEMS_PER_TASK}, --depth >= 1 and --sequence-len >= 16")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
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


def synthetic_item(shape: TaskShape, rng: random.Random, words: list[str]) -> dict[str, object]:
    def phrase(lengths: tuple[int, int]) -> str:
        start = rng.randrange(len(words) - lengths[1])
        return " ".join(words[start:start + rng.randint(*lengths)])

    if shape.task_type == "multiple_choice":
        choices = list(shape.fixed_choices) or [phrase(shape.answer_words) for _ in range(shape.choices)]
        return {"query": phrase(shape.context_words), "choices": choices, "gold": rng.randrange(shape.choices)}
    if shape.task_type == "schema":
        return {"context_options": [phrase(shape.context_words) for _ in range(shape.choices)],
                "continuation": phrase(shape.answer_words), "gold": rng.randrange(shape.choices)}
    return {"context": phrase(shape.context_words), "continuation": phrase(shape.answer_words)}


def write_synthetic_bundle(root: Path, items_per_task: int) -> Path:
    """A bundle in the DCLM layout with `items_per_task` items of each of CORE_SHAPES."""
    rng, words = random.Random(0), corpus_words()
    config = ["icl_tasks:"]
    baselines = ["Eval Task,Random baseline"]
    for shape in CORE_SHAPES:
        data = root / "eval_data" / f"{shape.label}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(synthetic_item(shape, rng, words)) + "\n" for _ in range(items_per_task)))
        config += [f"- label: {shape.label}", f"  dataset_uri: {shape.label}.jsonl",
                   f"  num_fewshot: [{shape.num_fewshot}]", f"  icl_task_type: {shape.task_type}",
                   f"  continuation_delimiter: {json.dumps(shape.delimiter)}"]
        baselines.append(f"{shape.label},{shape.random_baseline}")
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
          batch_tokens: int | None, repeats: int) -> None:
    """Per task, the best of `repeats` alternating runs of each path: the first run of a new shape pays
    one-off costs (the allocator growing its heap, kernel selection) that a full CORE run amortises."""
    batched_kwargs = {} if batch_tokens is None else {"batch_tokens": batch_tokens}
    print(f"{'task':>32} {'items':>6} {'batched s':>10} {'one-by-one s':>13} {'ratio':>7} {'disagree':>9}")
    total_items, total_batched, total_reference, total_disagree = 0, 0.0, 0.0, 0
    for task in tasks:
        batched_s = reference_s = float("inf")
        for _ in range(repeats):
            seconds, batched = timed(device, lambda t=task: score_task(model, tokenizer, t, **batched_kwargs))
            batched_s = min(batched_s, seconds)
            seconds, reference = timed(device, lambda t=task: score_task_reference(model, tokenizer, t))
            reference_s = min(reference_s, seconds)
        disagree = sum(batched[i] != reference[i] for i in reference)
        total_items += len(task.items)
        total_batched += batched_s
        total_reference += reference_s
        total_disagree += disagree
        print(f"{task.label:>32} {len(task.items):6d} {batched_s:10.2f} {reference_s:13.2f} "
              f"{reference_s / batched_s:6.2f}x {disagree:9d}")
    per_1000 = 1000 / total_items
    print(f"\nper 1,000 items: batched {total_batched * per_1000:.2f} s, one item at a time "
          f"{total_reference * per_1000:.2f} s -> {total_reference / total_batched:.2f}x faster; "
          f"{total_disagree} of {total_items} items judged differently")


def main() -> None:
    args = parse_args()
    _, device = compute_init(args.device_type or autodetect_device_type())
    tokenizer = load_or_train_tokenizer()
    cpu = PRESETS["cpu"]
    config = config_for_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.sequence_len,
                              head_dim=cpu["head_dim"], aspect_ratio=cpu["aspect_ratio"])
    model = build_model(config, device).eval()
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as scratch:
        bundle = args.bundle if args.bundle is not None else write_synthetic_bundle(Path(scratch), args.items_per_task)
        tasks = load_bundle(bundle, max_per_task=args.max_per_task if args.bundle is not None else None)
        source = args.bundle or "a synthetic bundle"
        print(f"device {device}, torch threads {torch.get_num_threads()}, model: n_layer={config.n_layer} "
              f"n_embd={config.n_embd} sequence_len={config.sequence_len} vocab={config.vocab_size}; "
              f"{sum(len(t.items) for t in tasks)} items in {len(tasks)} tasks from {source}")
        bench(tasks, model, tokenizer, device, args.batch_tokens, args.repeats)
    compute_cleanup()


if __name__ == "__main__":
    main()
