"""The evaluation job: `nanochat-eval` / `python -m nanochat_rs.eval` (nanochat's base_eval and chat_eval).

    nanochat-eval                                      # the newest chat model on the chat tasks: ChatCORE
    nanochat-eval --source base                        # the newest base model: CORE, val bpb, samples
    nanochat-eval --tasks gsm8k --num-samples 8 --temperature 0.8   # pass@8
    nanochat-eval --checkpoint DIR --step 300 --max-per-task 100
    torchrun --nproc_per_node=8 -m nanochat_rs.eval --source base

Chat (`chat_eval`): every task with an automatic check (`chat_eval.CHAT_EVAL_TASKS`). Without `--tasks`,
Hub tasks whose test split is neither on disk nor downloadable now (a quick probe of HF_ENDPOINT) are
left out with a note, so the job runs offline on the embedded tasks.
Base: CORE (`core_eval`; without `--tasks`, a bundle that cannot be fetched skips CORE with a note),
validation bits per byte over the last shard (as pretraining measures it) and a few greedy samples.

Library: `run_eval(EvalConfig(...)) -> results` (keys in its docstring). Errors follow `nanochat_rs.cli`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nanochat_rs.chat import SOURCES, add_checkpoint_args, default_checkpoint_dir
from nanochat_rs.cli import add_device_arg, run_job, usage_checked

# Modules that import torch are imported inside functions: `--help` answers at once.
if TYPE_CHECKING:
    import torch

    from nanochat_rs.chat_eval import Accuracy
    from nanochat_rs.gpt import GPT
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["BASE_EVALS", "EvalConfig", "build_parser", "check_config", "default_chat_tasks", "main", "run_eval"]

BASE_EVALS = ("core", "bpb", "samples")
DEFAULT_MAX_TOKENS = 512  # nanochat's: room for a GSM8K solution or a HumanEval function
DEFAULT_BATCH_SIZE = 8
SAMPLE_TOKENS = 16  # per greedy base-model sample
T = TypeVar("T")


@dataclass
class EvalConfig:
    source: str = "chat"                 # "chat": chat tasks (ChatCORE); "base": CORE, val bpb, samples
    checkpoint: str | Path | None = None  # run directory; None: the newest of `source`
    step: int | None = None              # None: the newest
    tasks: str | None = None             # comma list; None: all (see the module docstring)
    max_per_task: int | None = None      # examples per task (chat) or items per CORE task; None: all
    num_samples: int = 1                 # generative chat tasks: pass@num_samples
    temperature: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS  # per generated reply
    batch_size: int = DEFAULT_BATCH_SIZE  # prompts per forward (categorical tasks), rows per forward (bpb)
    device_type: str | None = None       # None: autodetect
    data_dir: str | None = None          # val bpb shards; None: NANOCHAT_DATA_DIR or the embedded corpus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat-eval", description="Evaluate a nanochat_rs model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, "chat: the chat tasks (ChatCORE) on the newest run under "
                           "NANOCHAT_BASE_DIR/chat_checkpoints (the base model when there is none yet); base: CORE, "
                           "val bpb and samples on the newest under base_checkpoints")
    p.add_argument("--tasks", default=None,
                   help="comma list. chat: task names (None: every task with an automatic check whose data is "
                        f"on disk or downloadable); base: {', '.join(BASE_EVALS)} (None: all)")
    p.add_argument("--max-per-task", type=int, default=None, help="examples per task (None: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem: pass@k")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 needed for --num-samples > 1")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens per generated reply")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="prompts per forward for multiple-choice tasks, rows per forward for val bpb")
    add_device_arg(p)
    p.add_argument("--data-dir", default=None, help="shards for val bpb (None: NANOCHAT_DATA_DIR or embedded)")
    return p


def main(argv: list[str] | None = None) -> None:
    config = EvalConfig(**vars(build_parser().parse_args(argv)))
    run_job(lambda: _evaluate(config))


def _evaluate(config: EvalConfig) -> dict[str, Any]:
    usage_checked(lambda: check_config(config))  # before the model is loaded
    return run_eval(config)


# ---- options ----------------------------------------------------------------------------------------


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError(f"--tasks {text!r} names no task")
    return names


def check_config(config: EvalConfig) -> list[str] | None:
    """Validate `config` (ValueError naming the problem); return the requested task names (None: defaults)."""
    from nanochat_rs.chat_eval import CHAT_EVAL_TASKS, check_num_samples
    from nanochat_rs.sampling import check_sampling_args
    from nanochat_rs.tasks.registry import check_task_name
    from nanochat_rs.util import check_int

    if config.source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {config.source!r}")
    for name in ("max_per_task", "step"):
        if getattr(config, name) is not None:
            check_int(f"--{name.replace('_', '-')}", getattr(config, name), 1 if name == "max_per_task" else 0)
    check_int("--batch-size", config.batch_size, 1)
    check_int("--max-tokens", config.max_tokens, 1)
    check_sampling_args(config.max_tokens, config.temperature, None, 0)
    check_num_samples(config.num_samples, config.temperature)
    names = _names(config.tasks)
    for name in names or ():
        if config.source == "base":
            if name not in BASE_EVALS:
                raise ValueError(f"--source base evaluates {', '.join(BASE_EVALS)}; got task {name!r}")
            continue
        check_task_name(name)  # unknown names: the registry's error, listing the known ones
        if name not in CHAT_EVAL_TASKS:
            raise ValueError(f"task {name!r} has no automatic evaluation; evaluable tasks: "
                             f"{', '.join(CHAT_EVAL_TASKS)}")
    return names


# ---- the job ----------------------------------------------------------------------------------------


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate a checkpoint as `config` says; print a table and return the results.

    Keys: "source", "checkpoint" (the run directory), "step", "config" (the EvalConfig as a dict), and
    what ran: "tasks" ({name: {"accuracy", "centered", ...}}: chat tasks with "correct", "total",
    "chance"; CORE tasks on base) with "chatcore" (chat) or "core" (base, when CORE ran), "val_bpb"
    (base) and "samples" ({prompt: greedy continuation}, base, rank 0). Under torchrun every rank
    returns the same numbers.
    """
    from nanochat_rs.common import autodetect_device_type, compute_cleanup, compute_init

    names = check_config(config)
    _, device = compute_init(config.device_type or autodetect_device_type())
    try:
        results = _run(config, names, device)
    except BaseException:
        compute_cleanup(wait_for_peers=False)  # under torchrun a failed peer may never reach the barrier
        raise
    compute_cleanup()
    return results


def _run(config: EvalConfig, names: list[str] | None, device: torch.device) -> dict[str, Any]:
    from nanochat_rs.checkpoint import load_model
    from nanochat_rs.common import base_dir, print0
    from nanochat_rs.report import append_section

    started = time.time()
    directory = Path(config.checkpoint) if config.checkpoint else default_checkpoint_dir(base_dir(), config.source)
    model, tokenizer, meta = load_model(directory, device, step=config.step)
    print0(f"Evaluating {directory} step {meta['step']} ({config.source} evaluation) on {device}")
    results: dict[str, Any] = {"source": config.source, "checkpoint": str(directory), "step": int(meta["step"]),
                               "config": asdict(config)}
    if config.source == "chat":
        results.update(_chat(model, tokenizer, config, names))
    else:
        results.update(_base(model, tokenizer, config, names, device))
    results["wall_time_s"] = time.time() - started
    report = ({"accuracy": {name: task["accuracy"] for name, task in results["tasks"].items()}}
              if config.source == "chat" else {})
    append_section(f"{config.source}-eval", {**results, **report})
    return results


def _on_rank0(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only and broadcast, so ranks that probe the network cannot disagree."""
    import torch.distributed as dist

    from nanochat_rs.common import get_dist_info, is_ddp_initialized

    if not is_ddp_initialized():
        return decide()
    box = [decide() if get_dist_info().rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def _table(rows: Sequence[tuple[str, float, float, str]], accuracy_header: str, last_header: str) -> str:
    width = max(len("task"), *(len(row[0]) for row in rows))
    lines = [f"{'task':<{width}}  {accuracy_header:>9}  {'centered':>9}  {last_header}"]
    lines += [f"{name:<{width}}  {accuracy:>9.2%}  {centered:>9.4f}  {last}" for name, accuracy, centered, last in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---- chat -----------------------------------------------------------------------------------------


def default_chat_tasks() -> tuple[list[str], str | None]:
    """The chat suite less the Hub tasks that are neither on disk nor downloadable now, and a note
    naming those left out (None when none is). The Hub is probed only when something is missing."""
    from nanochat_rs.chat_eval import CHAT_EVAL_TASKS
    from nanochat_rs.common import base_dir
    from nanochat_rs.tasks import ARC, GSM8K, MMLU, HumanEval
    from nanochat_rs.tasks.hub import hub_endpoint, hub_reachable, is_downloaded
    from nanochat_rs.tasks.registry import TASKS

    # the split each Hub task's test factory in registry.py loads, checked on disk without loading it
    test_splits = {"arc-easy": (ARC.REPO, "ARC-Easy", "test"), "arc-challenge": (ARC.REPO, "ARC-Challenge", "test"),
                   "mmlu": (MMLU.REPO, "all", "test"), "gsm8k": (GSM8K.REPO, "main", "test"),
                   "humaneval": (HumanEval.REPO, "openai_humaneval", "test")}
    missing = [name for name in CHAT_EVAL_TASKS if not TASKS[name].embedded and not is_downloaded(*test_splits[name])]
    if not missing or hub_reachable():
        return list(CHAT_EVAL_TASKS), None
    kept = [name for name in CHAT_EVAL_TASKS if name not in missing]
    only = "the embedded tasks only" if all(TASKS[name].embedded for name in kept) else ", ".join(kept)
    return kept, (f"Note: the Hub ({hub_endpoint()}) is unreachable and {', '.join(missing)} not downloaded: "
                  f"evaluating {only}. Set HF_ENDPOINT to a reachable mirror, or place the test splits under "
                  f"{base_dir() / 'task_data'}")


def _chat(model: GPT, tokenizer: Tokenizer, config: EvalConfig, names: list[str] | None) -> dict[str, Any]:
    from nanochat_rs.chat_eval import chatcore, task_accuracy
    from nanochat_rs.common import print0
    from nanochat_rs.engine import Engine
    from nanochat_rs.tasks.registry import get_task

    if names is None:
        names, note = _on_rank0(default_chat_tasks)
        if note:
            print0(note)
    engine = Engine(model, tokenizer)
    accuracies: dict[str, Accuracy] = {}
    for name in names:
        started = time.perf_counter()
        task = get_task(name, "test")
        accuracies[name] = accuracy = task_accuracy(
            engine, task, max_examples=config.max_per_task, batch_size=config.batch_size,
            max_tokens=config.max_tokens, temperature=config.temperature, num_samples=config.num_samples)
        print0(f"{name}: {accuracy.correct}/{accuracy.total} in {time.perf_counter() - started:.1f} s")
    score = chatcore(accuracies)
    header = "accuracy" if config.num_samples == 1 else f"pass@{config.num_samples}"
    print0(_table([(name, a.value, a.centered, f"{a.correct}/{a.total}") for name, a in accuracies.items()],
                  header, "correct"))
    print0(f"ChatCORE: {score:.4f} (mean centered accuracy over {len(accuracies)} tasks)")
    return {"tasks": {name: {"accuracy": a.value, "centered": a.centered, "correct": a.correct, "total": a.total,
                             "chance": a.chance} for name, a in accuracies.items()},
            "chatcore": score}


# ---- base -----------------------------------------------------------------------------------------


def _base(model: GPT, tokenizer: Tokenizer, config: EvalConfig, names: list[str] | None,
          device: torch.device) -> dict[str, Any]:
    from nanochat_rs.common import get_dist_info, print0

    evals = names or list(BASE_EVALS)
    results: dict[str, Any] = {}
    if "samples" in evals and get_dist_info().rank == 0:
        results["samples"] = _samples(model, tokenizer)
    if "bpb" in evals:
        results["val_bpb"] = _val_bpb(model, tokenizer, config, device)
        print0(f"validation bpb: {results['val_bpb']:.6f}")
    if "core" in evals and (bundle := _core_bundle(explicit=names is not None)) is not None:
        from nanochat_rs.core_eval import evaluate_core

        core = evaluate_core(model, tokenizer, bundle_dir=bundle, max_per_task=config.max_per_task)
        print0(_table([(label, core.accuracy[label], core.centered[label], "") for label in core.accuracy],
                      "accuracy", ""))
        print0(f"CORE: {core.core:.4f} (mean centered accuracy over {len(core.accuracy)} tasks)")
        results["tasks"] = {label: {"accuracy": core.accuracy[label], "centered": core.centered[label]}
                            for label in core.accuracy}
        results["core"] = core.core
    return results


def _samples(model: GPT, tokenizer: Tokenizer) -> dict[str, str]:
    from nanochat_rs.common import print0
    from nanochat_rs.pretrain import SAMPLE_PROMPTS

    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        room = min(SAMPLE_TOKENS, model.config.sequence_len - len(ids))
        samples[prompt] = tokenizer.decode(model.generate(ids, max_tokens=max(room, 0), temperature=0.0))
        print0(f"sample: {prompt!r} -> {samples[prompt]!r}")
    return samples


def _val_bpb(model: GPT, tokenizer: Tokenizer, config: EvalConfig, device: torch.device) -> float:
    """Bits per byte over the validation shard, as many tokens as pretraining's preset for this device
    evaluates (speedrun with CUDA, cpu otherwise)."""
    import torch

    from nanochat_rs import recipe
    from nanochat_rs.common import get_dist_info
    from nanochat_rs.dataloader import tokenizing_data_loader
    from nanochat_rs.loss_eval import evaluate_bpb
    from nanochat_rs.training import close_batches

    eval_tokens = recipe.PRESETS["speedrun" if device.type == "cuda" else "cpu"]["eval_tokens"]
    sequence_len = model.config.sequence_len
    steps = max(1, eval_tokens // (config.batch_size * sequence_len * get_dist_info().world_size))
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    batches = tokenizing_data_loader(tokenizer, config.batch_size, sequence_len, "val", device=device,
                                     data_dir=config.data_dir)
    try:
        return evaluate_bpb(model, batches, steps, token_bytes)
    finally:
        close_batches(batches)


def _core_bundle(explicit: bool) -> Path | None:
    """The CORE bundle, downloaded if needed. Asked for explicitly, failing to get it is an error;
    otherwise one attempt is made and a failure skips CORE with a note."""
    from nanochat_rs.common import print0
    from nanochat_rs.core_eval import ensure_eval_bundle
    from nanochat_rs.errors import DownloadError

    if explicit:
        return ensure_eval_bundle()

    def fetch_once() -> Path | str:
        try:
            return ensure_eval_bundle(max_attempts=1)
        except DownloadError as e:
            return str(e)

    found = _on_rank0(fetch_once)
    if isinstance(found, str):
        print0(f"Note: CORE skipped ({found})")
        return None
    return found


if __name__ == "__main__":
    main()
