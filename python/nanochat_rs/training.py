"""The optimisation loop shared by pretraining (`pretrain.py`) and fine-tuning (`finetune.py`).

Both jobs differ only in their data, their schedules, what they evaluate and where they save; the loop
itself is this one: evaluate / sample / save when due, then one optimizer step of gradient
accumulation over `grad_accum_steps` micro-batches, then a progress line. What differs comes in as a
`Horizon` (when the run ends and how far along it is) and `LoopHooks` (schedules, evaluation, sampling,
saving).

Exact resume: the loop takes the step, the loader state and the `LoopState` a checkpoint saved and
continues with the same batches; nothing in a step is random, so a resumed run reproduces the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from nanochat_rs.common import DistInfo, compute_cleanup, compute_init, is_ddp_initialized, print0
from nanochat_rs.memory import format_bytes

# Dense (non-sparse) bf16 tensor-core peak FLOP/s by a fragment of the CUDA device name: the
# denominator of MFU. First match wins, so the PCIe/NVL H100 variants come before plain "H100".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
)

LOSS_EMA_BETA = 0.9
ETA_WINDOW_STEPS = 20  # the ETA follows the recent step time, not the run's average

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, Any]]  # (inputs, targets, loader state)
T = TypeVar("T")


@dataclass
class LoopState:
    """Everything besides model/optimizer/data that a resumed run continues from (for logging only)."""

    smooth_loss: float = 0.0
    training_time_s: float = 0.0
    timed_steps: int = 0
    val_bpb: float | None = None
    min_val_bpb: float | None = None


# ---- horizons: when a run ends ---------------------------------------------------------------------


class Horizon(Protocol):
    """When the run ends and how far along it is, from the step and the state of the last batch."""

    def progress(self, step: int, loader_state: Any) -> float:
        """Fraction of the run done, in [0, 1] (drives the LR schedule)."""
        ...

    def done(self, step: int, loader_state: Any) -> bool:
        ...

    def steps_left(self, step: int, loader_state: Any) -> float | None:
        """An estimate for the ETA (None: unknown yet)."""
        ...


@dataclass(frozen=True)
class FixedSteps:
    """A run of exactly `num_iterations` optimizer steps."""

    num_iterations: int

    def progress(self, step: int, loader_state: Any) -> float:
        return step / self.num_iterations

    def done(self, step: int, loader_state: Any) -> bool:
        return step >= self.num_iterations

    def steps_left(self, step: int, loader_state: Any) -> float | None:
        return self.num_iterations - step


@dataclass(frozen=True)
class OneEpoch:
    """A run over one epoch of a finite dataset: the loader state's `consumed` examples (across all
    ranks) against `size`. How many steps that takes depends on how examples pack into rows, so it is
    only known once the epoch is used up."""

    size: int

    def progress(self, step: int, loader_state: Any) -> float:
        return 0.0 if loader_state is None else min(1.0, loader_state["consumed"] / self.size)

    def done(self, step: int, loader_state: Any) -> bool:
        return self.progress(step, loader_state) >= 1.0

    def steps_left(self, step: int, loader_state: Any) -> float | None:
        progress = self.progress(step, loader_state)
        return None if progress <= 0 else step * (1 - progress) / progress


# ---- hooks: what differs between jobs --------------------------------------------------------------


@dataclass
class LoopHooks:
    """The job-specific parts of the loop.

    `set_hyperparameters(step, progress)` sets the optimizer's LR/momentum/weight decay for the step;
    `evaluate(step)` evaluates (all ranks) and records into the LoopState; `sample()` prints samples
    (rank 0); `save(step, loader_state)` writes a checkpoint (all ranks).
    """

    set_hyperparameters: Callable[[int, float], None]
    evaluate: Callable[[int], None]
    save: Callable[[int, Any], None]
    sample: Callable[[], None] | None = None


@dataclass(frozen=True)
class LoopSchedule:
    """How often to evaluate, sample and save (<= 0 or None: only at the end)."""

    eval_every: int | None
    sample_every: int | None
    save_every: int | None


# ---- small pieces ----------------------------------------------------------------------------------


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from its name; None when the device is not in the table."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """MFU's denominator on CUDA (None elsewhere, or for a GPU not in PEAK_BF16_FLOPS: no MFU shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    flops = peak_flops(name)
    if flops is None:
        print0(f"Note: no bf16 peak FLOP/s known for {name}; the progress line will omit MFU")
    return flops


def compile_available(device: torch.device) -> str | None:
    """None when torch.compile works here; otherwise why not (one line).

    A tiny forward+backward through the same backend the model will use: on CPU, inductor needs a
    working C++ compiler, which a minimal machine may lack.
    """
    try:
        probe = torch.compile(lambda x: (x * x).sum(), dynamic=False)
        x = torch.ones(4, device=device, requires_grad=True)
        probe(x).backward()
    except Exception as e:  # dynamo/inductor raise many types (BackendCompilerFailed, CppCompileError, ...)
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0] if lines else ''}"
    return None


def use_compile(requested: bool, device: torch.device) -> bool:
    """Whether to torch.compile: as requested, unless compiling cannot work here (said once)."""
    if requested and (reason := compile_available(device)) is not None:
        print0(f"Note: torch.compile is unavailable here ({reason}); training eagerly (pass --no-compile "
               "to skip this check)")
        return False
    return requested


def ensure_writable(run_dir: Path, needed_bytes: int) -> None:
    """Check before training (not after it) that checkpoints can be written: a clear error now instead
    of a run whose result cannot be saved."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"cannot write checkpoints to {run_dir}: {e.strerror or e}; pass --run-dir "
                               "or set NANOCHAT_BASE_DIR to a writable directory") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OSError(28, f"{run_dir} has {format_bytes(free)} free, a checkpoint of this run needs about "
                          f"{format_bytes(needed_bytes)}; free some space or pass --run-dir")


def full_precision(model: torch.nn.Module, fp8: bool) -> contextlib.AbstractContextManager[Any]:
    """Evaluation and sampling run without fp8 so their numbers are comparable across runs."""
    if not fp8:
        return contextlib.nullcontext()
    from nanochat_rs.fp8 import disable_fp8  # fp8 runs only

    return disable_fp8(model)


class StepTimer:
    """Recent step durations: the ETA follows the current speed, not the run's average (which the
    first slow steps, an evaluation or a change of machine load would skew for the rest of the run)."""

    def __init__(self, window: int = ETA_WINDOW_STEPS) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)

    def eta_seconds(self, steps_left: float | None) -> float | None:
        if not self.recent or steps_left is None:
            return None
        return steps_left * sum(self.recent) / len(self.recent)


def progress_line(step: int, progress: float, loss: float, dt: float, tokens: int, eta_s: float | None,
                  flops_per_token: float, peak_flops_per_gpu: float | None, world_size: int,
                  num_iterations: int | None = None) -> str:
    where = f"step {step:05d}" + (f"/{num_iterations:05d}" if num_iterations is not None else "")
    line = (f"{where} ({100 * progress:5.1f}%) | loss {loss:.6f} | "
            f"dt {dt * 1000:8.1f} ms | tok/s {tokens / dt:,.0f}")
    if peak_flops_per_gpu is not None:
        mfu = flops_per_token * tokens / dt / (peak_flops_per_gpu * world_size)
        line += f" | mfu {100 * mfu:.2f}%"
    if eta_s is not None:
        line += f" | eta {eta_s / 60:.1f} min"
    return line


def is_due(step: int, every: int | None, last: bool) -> bool:
    return last or (every is not None and every > 0 and step % every == 0)


def close_batches(batches: Any) -> None:
    # Generators (and loaders with a prefetch thread) release their resources on close().
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agree_done(done: bool, device: torch.device) -> bool:
    """Every rank stops at the same step: a data-driven end can come one batch earlier on one rank."""
    if not is_ddp_initialized():
        return done
    flag = torch.tensor(int(done), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run_on_device(device_type: str, seed: int, job: Callable[[DistInfo, torch.device], T]) -> T:
    """`job(info, device)` between `compute_init` and `compute_cleanup`; on failure the cleanup does not
    wait for the other ranks (under torchrun a failed peer may never reach the barrier)."""
    info, device = compute_init(device_type, seed=seed)
    try:
        result = job(info, device)
    except BaseException:
        compute_cleanup(wait_for_peers=False)
        raise
    compute_cleanup()
    return result


# ---- the loop --------------------------------------------------------------------------------------


@dataclass
class LoopResult:
    step: int
    final_loss: float


def run_loop(*, model: torch.nn.Module, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             batches: Batches, horizon: Horizon, hooks: LoopHooks, schedule: LoopSchedule, loop: LoopState,
             grad_accum_steps: int, tokens_per_step: int, start_step: int, resumed: bool, loader_state: Any,
             info: DistInfo, device: torch.device, flops_per_token: float,
             num_iterations: int | None = None) -> LoopResult:
    """Train from `start_step` until `horizon` is done; returns the last step and training loss.

    `loader_state` is the state of the last batch consumed before `start_step` (None for a fresh run).
    `train_model` is `model` or its compiled wrapper; hooks receive the plain model's step numbers.
    """
    peak = device_peak_flops(device)
    timer = StepTimer()
    step, loss_value = start_step, float("nan")
    while True:
        last = _agree_done(horizon.done(step, loader_state), device)
        # A resumed run already evaluated/sampled/saved its first step before the interruption.
        fresh = step > start_step or not resumed
        if fresh and is_due(step, schedule.eval_every, last):
            hooks.evaluate(step)
        if hooks.sample is not None and info.rank == 0 and step > start_step and is_due(step, schedule.sample_every,
                                                                                         last):
            hooks.sample()
        if step > start_step and is_due(step, schedule.save_every, last):
            hooks.save(step, loader_state)
        if last:
            return LoopResult(step, loss_value)
        _sync(device)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum_steps):
            inputs, targets, loader_state = next(batches)
            loss = train_model(inputs, targets)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
        hooks.set_hyperparameters(step, horizon.progress(step, loader_state))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = float(loss_sum.item()) / grad_accum_steps  # also syncs the device
        _sync(device)
        dt = time.time() - t0
        if step > start_step:  # the first step of a session pays for warm-up/compilation
            loop.training_time_s += dt
            loop.timed_steps += 1
            timer.add(dt)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower the LRs")
        loop.smooth_loss = LOSS_EMA_BETA * loop.smooth_loss + (1 - LOSS_EMA_BETA) * loss_value
        step += 1
        debiased = loop.smooth_loss / (1 - LOSS_EMA_BETA**step)
        print0(progress_line(step, horizon.progress(step, loader_state), debiased, dt, tokens_per_step,
                             timer.eta_seconds(horizon.steps_left(step, loader_state)), flops_per_token, peak,
                             info.world_size, num_iterations))
