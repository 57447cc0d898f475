"""Base-model pretraining as library code: `train(TrainConfig(...)) -> summary`.

Every hyperparameter comes from `nanochat_rs.recipe`; this module only resolves a config against a
preset, derives the plan and runs the loop. One dial, depth, sets everything else for the speedrun
preset (see `plan_training`):

    model_dim   = ceil(depth * aspect_ratio / head_dim) * head_dim        (aspect 64, head_dim 128)
    N           = scaling params = block matrices + lm_head  (GPT.num_scaling_params())
    D           = ratio * N target tokens                     (ratio 8)
    B           = recipe.optimal_batch_tokens: B_ref * (D / D_ref) ** 0.383 to a power of two, then a
                  multiple of one micro-step (D_ref: the depth-12 model with the same vocab and seq len)
    lr          = base_lr * sqrt(B / B_ref)                   for the four base LRs
    wd          = recipe.scaled_weight_decay: keeps B / (lr * wd * D) at its d12 value
    iterations  = round(D / B)

The loop (`training.run_loop`, shared with fine-tuning): gradient accumulation up to the total batch,
schedules from `optim.apply_schedules`,
validation bits-per-byte every `eval_every` steps, greedy samples every `sample_every` steps, and
checkpoints (model, tokenizer, per-rank optimizer, per-rank dataloader state) every `save_every`
steps and at the end. The model and the optimizer updates are torch.compile'd unless
`compile=False`. `resume=True` continues from a checkpoint with the same data order; nothing in a
step is random, so a resumed run reproduces the uninterrupted run's parameters bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from nanochat_rs import recipe
from nanochat_rs.checkpoint import BASE_CHECKPOINTS
from nanochat_rs.cli import usage_checked
from nanochat_rs.common import DistInfo, base_dir, print0
from nanochat_rs.gpt import GPT, GPTConfig, build_model, config_for_depth
from nanochat_rs.memory import check_fits, checkpoint_bytes, training_memory_bytes
from nanochat_rs.recipe import PRESETS, Schedule
from nanochat_rs.report import append_section
from nanochat_rs.training import (
    FixedSteps,
    LoopHooks,
    LoopSchedule,
    LoopState,
    close_batches,
    ensure_writable,
    full_precision,
    run_loop,
    run_on_device,
    use_compile,
)
from nanochat_rs.util import check_int, check_number

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The Python programming language",
    "If yesterday was Friday, then tomorrow will be",
    "In this document we propose",
)
_BASE_LR_FIELDS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")


@dataclass
class TrainConfig:
    """Every knob of a pretraining run. None means: take it from the preset or the recipe (or derive it)."""

    preset: str | None = None            # "speedrun" | "cpu"; None: speedrun on CUDA, cpu elsewhere
    depth: int | None = None
    aspect_ratio: int | None = None      # model_dim = depth * aspect_ratio, rounded up to head_dim
    head_dim: int | None = None
    window_pattern: str = recipe.WINDOW_PATTERN
    sequence_len: int | None = None     # tokens per row: the model's context
    device_batch_size: int | None = None
    total_batch_size: int | None = None  # tokens per optimizer step; None: derived (speedrun)
    num_iterations: int | None = None    # None: derived from target_param_data_ratio
    target_param_data_ratio: float | None = None
    scale_hyperparameters: bool | None = None
    # base hyperparameters before the depth dial's scaling (None: recipe)
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    warmdown_ratio: float | None = None
    final_lr_frac: float | None = None
    eval_every: int | None = None        # <= 0: only at the end
    eval_tokens: int | None = None
    sample_every: int | None = None      # <= 0: only at the end
    sample_max_tokens: int = 16
    save_every: int | None = None        # <= 0: only at the end
    device_type: str | None = None       # None: autodetect
    fp8: bool = False
    compile: bool = True                 # torch.compile the model and the optimizer updates
    resume: bool = False
    resume_step: int | None = None       # None: the newest checkpoint in run_dir
    run_dir: str | None = None           # checkpoints; None: base_dir()/base_checkpoints/d{depth}
    data_dir: str | None = None          # parquet shards; None: NANOCHAT_DATA_DIR / embedded corpus
    tokenizer_dir: str | None = None     # None: the project tokenizer (trained on the embedded corpus if needed)
    seed: int = 42

    @property
    def schedule(self) -> Schedule:
        defaults = recipe.DEFAULT_SCHEDULE
        return Schedule(
            warmup_steps=defaults.warmup_steps if self.warmup_steps is None else self.warmup_steps,
            warmdown_ratio=defaults.warmdown_ratio if self.warmdown_ratio is None else self.warmdown_ratio,
            final_lr_frac=defaults.final_lr_frac if self.final_lr_frac is None else self.final_lr_frac)


@dataclass
class TrainPlan:
    """The concrete numbers a run uses, derived from a resolved TrainConfig."""

    model_config: GPTConfig
    num_scaling_params: int
    target_tokens: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    lr_scale: float
    weight_decay: float
    lrs: dict[str, float]  # the four base LRs after scaling: setup_optimizer's keyword arguments


# ---- configuration -----------------------------------------------------------------------------

_POSITIVE_INTS = ("depth", "aspect_ratio", "head_dim", "sequence_len", "device_batch_size", "eval_tokens",
                  "sample_max_tokens")


def resolve_config(config: TrainConfig, device_type: str) -> TrainConfig:
    """Fill every None field from the preset (speedrun on CUDA, cpu elsewhere) and the recipe; validate."""
    preset = config.preset or ("speedrun" if device_type == "cuda" else "cpu")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for name, default in PRESETS[preset].items():
        if values[name] is None:
            values[name] = default
    for name, default in (("embedding_lr", recipe.EMBEDDING_LR), ("unembedding_lr", recipe.UNEMBEDDING_LR),
                          ("matrix_lr", recipe.MATRIX_LR), ("scalar_lr", recipe.SCALAR_LR),
                          ("weight_decay", recipe.WEIGHT_DECAY)):
        if values[name] is None:
            values[name] = default
    values.update(preset=preset, device_type=device_type)
    resolved = TrainConfig(**values)
    resolved = replace(resolved, **asdict(resolved.schedule))  # validates the schedule, fills its Nones
    for name in _POSITIVE_INTS:
        check_int(name, getattr(resolved, name), 1)
    for name in ("total_batch_size", "num_iterations"):
        if getattr(resolved, name) is not None:  # None: automatic
            check_int(name, getattr(resolved, name), 1)
    check_number("target_param_data_ratio", resolved.target_param_data_ratio, math.ulp(0.0))
    for name in (*_BASE_LR_FIELDS, "weight_decay"):
        check_number(name, getattr(resolved, name), 0.0)
    if resolved.resume_step is not None and not resolved.resume:
        raise ValueError("resume_step is only meaningful with resume=True")
    return resolved


def model_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    assert config.depth and config.aspect_ratio and config.head_dim and config.sequence_len  # resolved
    return config_for_depth(config.depth, vocab_size, config.sequence_len, head_dim=config.head_dim,
                            aspect_ratio=config.aspect_ratio, window_pattern=config.window_pattern)


def scaling_params(config: GPTConfig) -> int:
    """Block matrices + lm_head of a GPT with this config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    counts = model.num_scaling_params()
    return int(counts["matrix"]) + int(counts["lm_head"])


def plan_training(config: TrainConfig, vocab_size: int, world_size: int = 1) -> TrainPlan:
    """Derive the model, batch, iterations, LRs and weight decay of a resolved config (module docstring)."""
    gpt_config = model_config(config, vocab_size)
    n_params = scaling_params(gpt_config)
    ratio = float(config.target_param_data_ratio or 0)
    target_tokens = int(ratio * n_params)
    micro_tokens = int(config.device_batch_size or 0) * int(config.sequence_len or 0) * world_size
    reference = config_for_depth(recipe.REFERENCE_DEPTH, vocab_size, gpt_config.sequence_len,
                                 head_dim=recipe.HEAD_DIM, aspect_ratio=recipe.ASPECT_RATIO,
                                 window_pattern=config.window_pattern)
    reference_tokens = ratio * scaling_params(reference)
    if config.total_batch_size is not None:
        total_batch = config.total_batch_size
    else:
        total_batch = recipe.optimal_batch_tokens(target_tokens, reference_tokens, micro_tokens)
    if total_batch % micro_tokens:
        raise ValueError(f"total_batch_size {total_batch} is not a multiple of device_batch_size * sequence_len * "
                         f"world_size = {micro_tokens}")
    num_iterations = config.num_iterations or max(1, round(target_tokens / total_batch))
    base_weight_decay = float(config.weight_decay if config.weight_decay is not None else recipe.WEIGHT_DECAY)
    if config.scale_hyperparameters:
        lr_scale = recipe.lr_batch_scale(total_batch)
        weight_decay = recipe.scaled_weight_decay(base_weight_decay, total_batch, reference_tokens,
                                                  num_iterations * total_batch)
    else:
        lr_scale, weight_decay = 1.0, base_weight_decay
    lrs = {name: float(getattr(config, name)) * lr_scale for name in _BASE_LR_FIELDS}
    return TrainPlan(model_config=gpt_config, num_scaling_params=n_params, target_tokens=target_tokens,
                     total_batch_size=total_batch, grad_accum_steps=total_batch // micro_tokens,
                     num_iterations=num_iterations, lr_scale=lr_scale, weight_decay=weight_decay, lrs=lrs)


# ---- pieces of the job -------------------------------------------------------------------------------


def _load_tokenizer(config: TrainConfig) -> Any:
    from nanochat_rs.tok_train import load_or_train_tokenizer

    return load_or_train_tokenizer(config.tokenizer_dir)


def check_fp8_device(device: torch.device) -> None:
    """fp8 needs torch._scaled_mm on a GPU with fp8 tensor cores; say so before building anything."""
    from nanochat_rs.fp8 import scaled_mm_supported

    if device.type != "cuda":
        raise ValueError("fp8 training needs a CUDA device (torch._scaled_mm)")
    if not scaled_mm_supported(device):
        raise ValueError("fp8 training needs fp8 tensor cores (CUDA compute capability >= 8.9, e.g. H100), "
                         "which this GPU lacks; train without --fp8")


def _build_model(plan: TrainPlan, config: TrainConfig, device: torch.device) -> GPT:
    if config.fp8:
        check_fp8_device(device)
    assert config.device_batch_size
    check_fits(training_memory_bytes(plan.model_config, config.device_batch_size), device,
               f"training depth {plan.model_config.n_layer} (dim {plan.model_config.n_embd}) at "
               f"{config.device_batch_size}x{plan.model_config.sequence_len} tokens per micro-step")
    model = build_model(plan.model_config, device)
    if config.fp8:
        from nanochat_rs.fp8 import convert_to_float8_training

        # Block matmuls only: the lm_head feeds the soft-capped logits and stays in high precision.
        convert_to_float8_training(model, lambda module, fqn: fqn.startswith("transformer.h."))
    return model


def _resume(run_dir: Path, config: TrainConfig, plan: TrainPlan, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, Any, LoopState]:
    from nanochat_rs.checkpoint import CheckpointError, load_checkpoint

    model_state, optim_state, meta = load_checkpoint(run_dir, config.resume_step, device=device)
    if meta["step"] > plan.num_iterations:
        raise ValueError(f"cannot resume: the checkpoint is at step {meta['step']}, past this run's "
                         f"{plan.num_iterations} iterations; pass num_iterations >= {meta['step']}")
    if meta["model_config"] != asdict(plan.model_config):
        raise ValueError(f"cannot resume: the checkpoint's model {meta['model_config']} differs from this "
                         f"run's {asdict(plan.model_config)}; pass the same depth/preset/sequence_len as the "
                         "original run")
    model.load_state_dict(model_state, strict=True)
    assert optim_state is not None
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {run_dir} does not fit this optimizer: {e}") from None
    saved_plan = meta.get("plan", {})
    for key in ("total_batch_size", "num_iterations"):
        if saved_plan.get(key) not in (None, getattr(plan, key)):
            print0(f"Note: {key} was {saved_plan[key]} in the checkpoint, now {getattr(plan, key)}: "
                   "the continuation will differ from the original run")
    loop = LoopState(**meta.get("loop_state", {}))
    print0(f"Resumed from {run_dir} at step {meta['step']}")
    return int(meta["step"]), meta["dataloader_state"], loop  # this rank's: load_checkpoint checked world size


def _evaluate(model: torch.nn.Module, tokenizer: Any, config: TrainConfig, token_bytes: torch.Tensor,
              info: DistInfo, device: torch.device) -> float:
    from nanochat_rs.dataloader import tokenizing_data_loader
    from nanochat_rs.loss_eval import evaluate_bpb

    assert config.device_batch_size and config.sequence_len and config.eval_tokens
    steps = max(1, config.eval_tokens // (config.device_batch_size * config.sequence_len * info.world_size))
    batches = tokenizing_data_loader(tokenizer, config.device_batch_size, config.sequence_len, "val",
                                     device=device, data_dir=config.data_dir)
    try:
        return evaluate_bpb(model, batches, steps, token_bytes)
    finally:
        close_batches(batches)


def _sample(model: Any, tokenizer: Any, max_tokens: int) -> None:
    was_training = model.training
    model.eval()
    try:
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            completion = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
            print0(f"  sample: {prompt!r} -> {tokenizer.decode(completion)!r}")
    finally:
        model.train(was_training)


def _save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          loader_state: Any, loop: LoopState, config: TrainConfig, plan: TrainPlan, tokenizer: Any,
          info: DistInfo) -> None:
    from nanochat_rs.checkpoint import save_checkpoint

    meta = {"model_config": asdict(plan.model_config), "step": step, "dataloader_state": loader_state,
            "train_config": asdict(config), "plan": asdict(plan), "loop_state": asdict(loop)}
    path = save_checkpoint(run_dir, step, model, optimizer, meta, rank=info.rank, tokenizer=tokenizer)
    print0(f"Saved checkpoint {path}")


# ---- the job ---------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict[str, Any]:
    """Pretrain a base model; returns a summary (steps, final/min val bpb, times, checkpoint dir)."""
    from nanochat_rs.common import autodetect_device_type

    # a bad flag is a usage error (exit 2 from the job), found before any slow work
    resolved = usage_checked(lambda: resolve_config(config, config.device_type or autodetect_device_type()))
    assert resolved.device_type is not None
    return run_on_device(resolved.device_type, resolved.seed, lambda info, device: _train(resolved, info, device))


def _train(config: TrainConfig, info: DistInfo, device: torch.device) -> dict[str, Any]:
    from nanochat_rs.dataloader import tokenizing_data_loader
    from nanochat_rs.optim import apply_schedules

    wall_start = time.time()
    tokenizer = _load_tokenizer(config)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    plan = plan_training(config, tokenizer.vocab_size, info.world_size)
    run_dir = Path(config.run_dir) if config.run_dir else base_dir() / BASE_CHECKPOINTS / f"d{config.depth}"
    model = _build_model(plan, config, device)  # refuses a model that cannot fit before allocating it
    if info.rank == 0:
        ensure_writable(run_dir, checkpoint_bytes(plan.model_config))
    compiled = use_compile(config.compile, device)
    optimizer = model.setup_optimizer(**plan.lrs, weight_decay=plan.weight_decay, compiled_step=compiled)
    step, loader_state, loop = 0, None, LoopState()
    if config.resume:
        step, loader_state, loop = _resume(run_dir, config, plan, model, optimizer, device)
    train_model = torch.compile(model, dynamic=False) if compiled else model
    _print_plan(config, plan, run_dir, tokenizer.vocab_size, compiled)

    def evaluate(at_step: int) -> None:
        with full_precision(model, config.fp8):
            loop.val_bpb = _evaluate(train_model, tokenizer, config, token_bytes, info, device)
        loop.min_val_bpb = min(loop.val_bpb, loop.min_val_bpb or math.inf)
        print0(f"step {at_step:05d} | validation bpb {loop.val_bpb:.6f}")

    def sample() -> None:
        with full_precision(model, config.fp8):
            _sample(model, tokenizer, config.sample_max_tokens)

    hooks = LoopHooks(
        set_hyperparameters=lambda at_step, _: apply_schedules(optimizer, at_step, plan.num_iterations,
                                                               config.schedule),
        evaluate=evaluate, sample=sample,
        save=lambda at_step, state: _save(run_dir, at_step, model, optimizer, state, loop, config, plan,
                                          tokenizer, info))
    batches = tokenizing_data_loader(tokenizer, config.device_batch_size, config.sequence_len, "train",
                                     device=device, resume_state=loader_state, data_dir=config.data_dir)
    try:
        result = run_loop(model=model, train_model=train_model, optimizer=optimizer, batches=batches,
                          horizon=FixedSteps(plan.num_iterations), hooks=hooks,
                          schedule=LoopSchedule(config.eval_every, config.sample_every, config.save_every),
                          loop=loop, grad_accum_steps=plan.grad_accum_steps, tokens_per_step=plan.total_batch_size,
                          start_step=step, resumed=config.resume, loader_state=loader_state, info=info,
                          device=device, flops_per_token=float(model.estimate_flops()),
                          num_iterations=plan.num_iterations)
    finally:
        close_batches(batches)

    summary = {
        "steps": result.step, "num_iterations": plan.num_iterations, "final_loss": result.final_loss,
        "final_val_bpb": loop.val_bpb, "min_val_bpb": loop.min_val_bpb,
        "training_time_s": loop.training_time_s, "wall_time_s": time.time() - wall_start,
        "tokens_trained": result.step * plan.total_batch_size, "checkpoint_dir": str(run_dir),
        "num_scaling_params": plan.num_scaling_params,
    }
    print0(f"Done: {summary['steps']} steps, {summary['tokens_trained']:,} tokens, "
           f"wall time {summary['wall_time_s'] / 60:.2f} min, final val bpb {_fmt(loop.val_bpb)}, "
           f"min val bpb {_fmt(loop.min_val_bpb)}; checkpoints in {run_dir}")
    append_section("base-train", {**summary, "config": asdict(config), "plan": asdict(plan)})
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def _print_plan(config: TrainConfig, plan: TrainPlan, run_dir: Path, vocab_size: int, compiled: bool) -> None:
    mc = plan.model_config
    print0(f"preset {config.preset} | depth {mc.n_layer} | dim {mc.n_embd} | heads {mc.n_head} | "
           f"seq {mc.sequence_len} | vocab {vocab_size} | scaling params {plan.num_scaling_params:,}")
    print0(f"batch {plan.total_batch_size:,} tokens ({plan.grad_accum_steps} micro-steps of "
           f"{config.device_batch_size}x{config.sequence_len}) | iterations {plan.num_iterations} | "
           f"lr scale {plan.lr_scale:.4f} | weight decay {plan.weight_decay:.4f} | "
           f"{'compiled' if compiled else 'eager'} | run dir {run_dir}")
