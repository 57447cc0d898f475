"""Supervised fine-tuning as library code: `finetune(SFTConfig(...)) -> summary` (nanochat's chat_sft).

A base checkpoint becomes a chat model by training on conversations, where only the assistant's
tokens are targets. The run:

  * loads the newest base checkpoint under $NANOCHAT_BASE_DIR/base_checkpoints (or `source`/`step`),
    with the tokenizer stored in it;
  * inherits sequence length, batch sizes and the (scaled) LRs of the base run, unless overridden;
  * warm-starts the optimizer from the base run's moments (`load_optimizer`), with fresh LRs at
    `recipe.SFT_INIT_LR_FRAC` of the base run's and weight decay 0;
  * trains on a task mixture (`recipe.SFT_MIXTURES`: nanochat's with CUDA, the embedded synthetic one
    elsewhere, or `tasks`) packed by the Rust packer in pad mode (`chat_data`), through the training
    loop pretraining uses (`training.run_loop`), for one epoch of the mixture or `num_iterations`;
  * evaluates validation bits per byte on the held-out conversations and the accuracy of greedy
    replies (through the Engine, calculator on) on the held-out splits of the mixture's embedded tasks;
  * writes chat_checkpoints/d{depth} atomically, and resumes exactly (`resume`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from nanochat_rs import recipe
from nanochat_rs.chat_data import conversation_data_loader
from nanochat_rs.chat_eval import generative_accuracy
from nanochat_rs.checkpoint import (
    BASE_CHECKPOINTS,
    CHAT_CHECKPOINTS,
    CheckpointError,
    load_checkpoint,
    load_model,
    newest_checkpoint_dir,
    save_checkpoint,
    step_dir,
)
from nanochat_rs.cli import usage_checked
from nanochat_rs.common import DistInfo, base_dir, print0
from nanochat_rs.engine import Engine
from nanochat_rs.gpt import GPT
from nanochat_rs.loss_eval import evaluate_bpb
from nanochat_rs.memory import check_fits, checkpoint_bytes, training_memory_bytes
from nanochat_rs.optim import apply_sft_schedules, warm_start
from nanochat_rs.report import append_section
from nanochat_rs.tasks.registry import TASKS, build_mixture, get_task, parse_task_specs
from nanochat_rs.training import (
    FixedSteps,
    Horizon,
    LoopHooks,
    LoopSchedule,
    LoopState,
    OneEpoch,
    close_batches,
    ensure_writable,
    run_loop,
    run_on_device,
    use_compile,
)
from nanochat_rs.util import check_int, check_number

_LR_FIELDS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
HELD_OUT_MAX_TOKENS = 64  # the embedded tasks' replies are ~30 tokens; a base model would ramble on
_INHERITED = ("sequence_len", "device_batch_size", "total_batch_size", *_LR_FIELDS)


@dataclass
class SFTConfig:
    """Every knob of a fine-tuning run. None means: inherit it from the base run, or take the preset's."""

    source: str | None = None            # base run directory (holding step_*); None: the newest base run
    step: int | None = None              # base checkpoint step; None: the newest in `source`
    preset: str | None = None            # "speedrun" | "cpu" (recipe.SFT_PRESETS); None: by device
    mixture: str | None = None           # recipe.SFT_MIXTURES name; None: the preset's
    tasks: str | None = None             # "name[:epochs],..." instead of a named mixture
    max_examples: int | None = None      # cut every task to its first N conversations
    sequence_len: int | None = None      # None: the base run's (inherited)
    device_batch_size: int | None = None
    total_batch_size: int | None = None
    embedding_lr: float | None = None    # the four LRs: None inherits the base run's peak LRs
    unembedding_lr: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    init_lr_frac: float | None = None    # None: recipe.SFT_INIT_LR_FRAC
    warmup_ratio: float | None = None    # None: recipe.DEFAULT_SFT_SCHEDULE
    warmdown_ratio: float | None = None
    final_lr_frac: float | None = None
    num_iterations: int | None = None    # None: one epoch of the mixture
    load_optimizer: bool = True          # warm-start the optimizer moments from the base run
    eval_every: int | None = None        # <= 0: only at the end
    eval_tokens: int | None = None
    eval_examples: int | None = None     # held-out conversations per embedded task for accuracy
    save_every: int | None = None        # <= 0: only at the end
    device_type: str | None = None
    compile: bool = True
    resume: bool = False
    resume_step: int | None = None
    run_dir: str | None = None           # None: $NANOCHAT_BASE_DIR/chat_checkpoints/d{depth}
    seed: int = 42

    @property
    def schedule(self) -> recipe.SFTSchedule:
        defaults = recipe.DEFAULT_SFT_SCHEDULE
        return recipe.SFTSchedule(
            warmup_ratio=defaults.warmup_ratio if self.warmup_ratio is None else self.warmup_ratio,
            warmdown_ratio=defaults.warmdown_ratio if self.warmdown_ratio is None else self.warmdown_ratio,
            final_lr_frac=defaults.final_lr_frac if self.final_lr_frac is None else self.final_lr_frac)


def resolve_config(config: SFTConfig, device_type: str) -> SFTConfig:
    """Fill the preset's values and check every flag that does not need the base checkpoint (usage
    errors before any work): ValueError with a one-line message."""
    preset = config.preset or ("speedrun" if device_type == "cuda" else "cpu")
    if preset not in recipe.SFT_PRESETS:
        raise ValueError(f"preset must be one of {sorted(recipe.SFT_PRESETS)}, got {preset!r}")
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for name, default in recipe.SFT_PRESETS[preset].items():
        if values[name] is None:
            values[name] = default
    if values["init_lr_frac"] is None:
        values["init_lr_frac"] = recipe.SFT_INIT_LR_FRAC
    values.update(preset=preset, device_type=device_type)
    resolved = SFTConfig(**values)
    resolved = replace(resolved, **asdict(resolved.schedule))  # validates the schedule, fills its Nones
    if resolved.tasks is not None:
        parse_task_specs(resolved.tasks)
    elif resolved.mixture not in recipe.SFT_MIXTURES:
        raise ValueError(f"mixture must be one of {sorted(recipe.SFT_MIXTURES)}, got {resolved.mixture!r}")
    for name in ("sequence_len", "device_batch_size", "total_batch_size", "num_iterations", "max_examples"):
        if getattr(resolved, name) is not None:
            check_int(name, getattr(resolved, name), 1 if name != "max_examples" else 0)
    for name in ("eval_tokens", "eval_examples"):
        check_int(name, getattr(resolved, name), 1)
    for name in _LR_FIELDS:
        if getattr(resolved, name) is not None:
            check_number(name, getattr(resolved, name), 0.0)
    check_number("init_lr_frac", resolved.init_lr_frac, 0.0)
    if resolved.step is not None:
        check_int("step", resolved.step, 0)
    if resolved.resume_step is not None and not resolved.resume:
        raise ValueError("resume_step is only meaningful with resume=True")
    return resolved


def task_specs(config: SFTConfig) -> list[tuple[str, int]]:
    if config.tasks is not None:
        return parse_task_specs(config.tasks)
    assert config.mixture is not None  # resolved
    return list(recipe.SFT_MIXTURES[config.mixture])


# ---- the base run --------------------------------------------------------------------------------


@dataclass
class BaseRun:
    """The checkpoint fine-tuning starts from and the settings it inherits."""

    directory: Path
    step: int
    meta: dict[str, Any]

    def inherited(self) -> dict[str, Any]:
        train_config = self.meta.get("train_config", {})
        plan = self.meta.get("plan", {})
        values = {"sequence_len": self.meta["model_config"]["sequence_len"],
                  "device_batch_size": train_config.get("device_batch_size"),
                  "total_batch_size": plan.get("total_batch_size"), **plan.get("lrs", {})}
        return {name: values.get(name) for name in _INHERITED}


def find_base_run(config: SFTConfig) -> Path:
    if config.source is not None:
        return Path(config.source)
    root = base_dir() / BASE_CHECKPOINTS
    found = newest_checkpoint_dir(root)
    if found is None:
        raise FileNotFoundError(f"no base checkpoint under {root}: pretrain one first with nanochat-train, "
                                "or pass --source DIR")
    return found


def _inherit(config: SFTConfig, base: BaseRun, world_size: int) -> SFTConfig:
    """Fill the inherited Nones from the base run (saying where each value came from)."""
    values = {}
    for name, inherited in base.inherited().items():
        given = getattr(config, name)
        if given is None:
            if inherited is None:
                raise CheckpointError(f"the base checkpoint {base.directory} does not record {name}; pass "
                                      f"--{name.replace('_', '-')}")
            values[name] = inherited
        elif inherited is not None and given != inherited:
            print0(f"Note: --{name.replace('_', '-')} {given} overrides the base run's {inherited}")
    resolved = replace(config, **values)
    micro = int(resolved.device_batch_size or 0) * int(resolved.sequence_len or 0) * world_size
    if int(resolved.total_batch_size or 0) % micro:
        raise ValueError(f"total_batch_size {resolved.total_batch_size} is not a multiple of device_batch_size * "
                         f"sequence_len * world_size = {micro}")
    return resolved


# ---- pieces of the job ---------------------------------------------------------------------------


def _held_out_tasks(specs: list[tuple[str, int]]) -> list[str]:
    """Tasks whose held-out accuracy is measured during fine-tuning: the mixture's embedded ones that
    can be checked automatically (the hub tasks are the evaluation job's)."""
    return [name for name, _ in specs if TASKS[name].embedded]


def _accuracies(model: GPT, tokenizer: Any, names: list[str], max_examples: int) -> dict[str, float]:
    engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        return {name: generative_accuracy(engine, get_task(name, "test"), max_examples, HELD_OUT_MAX_TOKENS).value
                for name in names}
    finally:
        model.train(was_training)


def _save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader_state: Any,
          loop: LoopState, config: SFTConfig, base: BaseRun, accuracies: dict[str, float], tokenizer: Any,
          info: DistInfo) -> None:
    meta = {"model_config": base.meta["model_config"], "step": step, "dataloader_state": loader_state,
            "sft_config": asdict(config), "loop_state": asdict(loop), "accuracy": accuracies,
            "source": {"directory": str(base.directory), "step": base.step,
                       "tokenizer_id": base.meta.get("tokenizer_id")}}
    path = save_checkpoint(run_dir, step, model, optimizer, meta, rank=info.rank, tokenizer=tokenizer)
    print0(f"Saved checkpoint {path}")


def _resume(run_dir: Path, config: SFTConfig, base: BaseRun, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, Any, LoopState, dict[str, float]]:
    model_state, optim_state, meta = load_checkpoint(run_dir, config.resume_step, device=device)
    if meta["model_config"] != base.meta["model_config"]:
        raise ValueError(f"cannot resume: the checkpoint in {run_dir} holds another model than the base run "
                         f"{base.directory}; pass the same --source as the original run")
    if meta.get("tokenizer_id") != base.meta.get("tokenizer_id"):
        raise CheckpointError(f"cannot resume: the checkpoint in {run_dir} was trained with another tokenizer "
                              f"than the base run {base.directory}")
    if config.num_iterations is not None and meta["step"] > config.num_iterations:
        raise ValueError(f"cannot resume: the checkpoint is at step {meta['step']}, past num_iterations "
                         f"{config.num_iterations}")
    model.load_state_dict(model_state, strict=True)
    assert optim_state is not None
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {run_dir} does not fit this optimizer: {e}") from None
    print0(f"Resumed from {run_dir} at step {meta['step']}")
    return (int(meta["step"]), meta["dataloader_state"], LoopState(**meta.get("loop_state", {})),
            dict(meta.get("accuracy", {})))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


# ---- the job -------------------------------------------------------------------------------------


def finetune(config: SFTConfig) -> dict[str, Any]:
    """Fine-tune a base checkpoint into a chat model; returns a summary (steps, val bpb, accuracies,
    times, checkpoint dir)."""
    from nanochat_rs.common import autodetect_device_type

    # a bad flag is a usage error (exit 2 from the job), found before the base checkpoint is loaded
    resolved = usage_checked(lambda: resolve_config(config, config.device_type or autodetect_device_type()))
    assert resolved.device_type is not None
    return run_on_device(resolved.device_type, resolved.seed, lambda info, device: _finetune(resolved, info, device))


def _finetune(config: SFTConfig, info: DistInfo, device: torch.device) -> dict[str, Any]:
    wall_start = time.time()
    source = find_base_run(config)
    model, tokenizer, meta = load_model(source, device, step=config.step)
    base = BaseRun(source, int(meta["step"]), meta)
    config = _inherit(config, base, info.world_size)
    assert config.sequence_len and config.device_batch_size and config.total_batch_size  # inherited
    if config.sequence_len > model.config.sequence_len:
        print0(f"Note: sequence_len {config.sequence_len} is longer than the base model's "
               f"{model.config.sequence_len}; positions past it were never trained")
    check_fits(training_memory_bytes(model.config, config.device_batch_size), device,
               f"fine-tuning depth {model.config.n_layer} at {config.device_batch_size}x{config.sequence_len} "
               "tokens per micro-step")
    model.train()
    specs = task_specs(config)
    train_tasks = build_mixture(specs, "train", config.max_examples, seed=config.seed)
    val_tasks = build_mixture(specs, "test", config.max_examples, seed=config.seed)
    held_out = _held_out_tasks(specs)
    run_dir = Path(config.run_dir) if config.run_dir else base_dir() / CHAT_CHECKPOINTS / f"d{model.config.n_layer}"
    if info.rank == 0:
        ensure_writable(run_dir, checkpoint_bytes(model.config))

    compiled = use_compile(config.compile, device)
    lrs = {name: float(getattr(config, name)) for name in _LR_FIELDS}
    optimizer = model.setup_optimizer(**lrs, weight_decay=recipe.SFT_WEIGHT_DECAY, compiled_step=compiled)
    for group in optimizer.param_groups:  # the schedule multiplies initial_lr
        group["initial_lr"] = group["lr"] = group["lr"] * float(config.init_lr_frac or 0)
    step, loader_state, loop, accuracies = 0, None, LoopState(), {}
    initial: dict[str, Any] = {}  # the base model's figures: the first evaluation of a fresh run
    if config.resume:
        step, loader_state, loop, accuracies = _resume(run_dir, config, base, model, optimizer, device)
    elif config.load_optimizer:
        _, base_optimizer, _ = load_checkpoint(source, base.step, device=device)
        assert base_optimizer is not None
        try:
            warm_start(optimizer, base_optimizer)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the optimizer state of {source} does not fit this model's optimizer ({e}); "
                                  "pass --no-load-optimizer to start with fresh moments") from None
        print0(f"Warm-started the optimizer from {step_dir(source, base.step)} (moments only, fresh LRs)")
    train_model = torch.compile(model, dynamic=False) if compiled else model
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    grad_accum = config.total_batch_size // (config.device_batch_size * config.sequence_len * info.world_size)
    horizon: Horizon = (FixedSteps(config.num_iterations) if config.num_iterations is not None
                        else OneEpoch(len(train_tasks)))
    print0(f"fine-tuning {step_dir(source, base.step)} | depth {model.config.n_layer} | seq {config.sequence_len} | "
           f"batch {config.total_batch_size:,} tokens ({grad_accum} micro-steps of "
           f"{config.device_batch_size}x{config.sequence_len}) | "
           + (f"{config.num_iterations} iterations" if config.num_iterations is not None else "one epoch"))
    print0(f"mixture: {len(train_tasks):,} conversations ({', '.join(f'{n} x{e}' for n, e in specs)}) | "
           f"LRs {', '.join(f'{k} {v * float(config.init_lr_frac or 0):.4g}' for k, v in lrs.items())} | "
           f"{'compiled' if compiled else 'eager'} | run dir {run_dir}")

    def evaluate(at_step: int) -> None:
        assert config.eval_tokens and config.eval_examples
        steps = max(1, config.eval_tokens // (config.device_batch_size * config.sequence_len * info.world_size))
        batches = conversation_data_loader(tokenizer, val_tasks, config.device_batch_size, config.sequence_len,
                                           device=device)
        try:
            loop.val_bpb = evaluate_bpb(train_model, batches, steps, token_bytes)
        finally:
            close_batches(batches)
        loop.min_val_bpb = min(loop.val_bpb, loop.min_val_bpb or math.inf)
        accuracies.update(_accuracies(model, tokenizer, held_out, config.eval_examples))
        shown = "".join(f" | {name} accuracy {100 * value:.1f}%" for name, value in accuracies.items())
        print0(f"step {at_step:05d} | validation bpb {loop.val_bpb:.6f}{shown}")
        if at_step == 0:
            initial.update(val_bpb=loop.val_bpb, accuracy=dict(accuracies))

    def set_hyperparameters(at_step: int, progress: float) -> None:
        apply_sft_schedules(optimizer, at_step, progress, config.schedule)

    hooks = LoopHooks(set_hyperparameters=set_hyperparameters, evaluate=evaluate,
                      save=lambda at_step, state: _save(run_dir, at_step, model, optimizer, state, loop, config,
                                                        base, accuracies, tokenizer, info))
    batches = conversation_data_loader(tokenizer, train_tasks, config.device_batch_size, config.sequence_len,
                                       device=device, resume_state=loader_state)
    try:
        result = run_loop(model=model, train_model=train_model, optimizer=optimizer, batches=batches,
                          horizon=horizon, hooks=hooks, schedule=LoopSchedule(config.eval_every, None,
                                                                              config.save_every),
                          loop=loop, grad_accum_steps=grad_accum, tokens_per_step=config.total_batch_size,
                          start_step=step, resumed=config.resume, loader_state=loader_state, info=info,
                          device=device, flops_per_token=float(model.estimate_flops()),
                          num_iterations=config.num_iterations)
    finally:
        close_batches(batches)

    summary = {
        "steps": result.step, "final_loss": result.final_loss, "final_val_bpb": loop.val_bpb,
        "min_val_bpb": loop.min_val_bpb, "accuracy": dict(accuracies), "initial": initial,
        "training_time_s": loop.training_time_s,
        "wall_time_s": time.time() - wall_start, "tokens_trained": result.step * config.total_batch_size,
        "conversations": len(train_tasks), "checkpoint_dir": str(run_dir),
        "source": str(step_dir(source, base.step)),
    }
    shown = ", ".join(f"{name} {100 * value:.1f}%" for name, value in accuracies.items()) or "n/a"
    print0(f"Done: {result.step} steps, wall time {summary['wall_time_s'] / 60:.2f} min, final val bpb "
           f"{_fmt(loop.val_bpb)}, held-out accuracy {shown}; checkpoints in {run_dir}")
    append_section("sft", {**summary, "config": asdict(config)})
    return summary
