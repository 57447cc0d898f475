"""The training recipe: every hyperparameter of pretraining, stated once (nanochat's published values).

Pure Python, no torch: the model (`gpt.py`), the optimizer (`optim.py`) and the training job
(`pretrain.py`) take their numbers from here and carry no numeric defaults of their own.

Parameter groups (`GPT.setup_optimizer`), with s = (n_embd / 768) ** -0.5 scaling only the
embedding-like AdamW groups:

    group                                 lr                     betas          weight decay
    lm_head                               unembedding_lr * s     (0.8, 0.96)    0.01
    wte                                   embedding_lr * s       (0.8, 0.995)   0.001
    value_embeds                          embedding_lr * s * 0.5 (0.8, 0.995)   0.01
    resid_lambdas                         scalar_lr * 0.01       (0.8, 0.95)    0.05
    x0_lambdas                            scalar_lr              (0.96, 0.95)   0
    smear gate, smear_lambda, backout     0.2                    (0.8, 0.95)    0
    Muon, one group per matrix shape      matrix_lr              momentum 0.95, ns_steps 5, beta2 0.9,
                                                                 weight_decay (cosine-scheduled)

Schedules (`lr_multiplier`, `muon_momentum`, `weight_decay_multiplier`) and the depth dial
(`plan_*` helpers: batch size, LR and weight-decay scaling with model size) follow below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nanochat_rs.util import check_int, check_number

# ---- optimizer: base values (the arguments of GPT.setup_optimizer) -------------------------------

EMBEDDING_LR = 0.3
UNEMBEDDING_LR = 0.008
MATRIX_LR = 0.02
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.28  # Muon matrices only; scaled with the batch and the horizon by the depth dial

# AdamW LRs were tuned at model_dim 768: an Adam step has a fixed size per coordinate, so wider
# embeddings take proportionally smaller steps.
ADAMW_REFERENCE_DIM = 768
ADAMW_EPS = 1e-10


@dataclass(frozen=True)
class AdamWGroupSpec:
    """One AdamW group: its LR is `base * lr_multiplier` (times s when `dim_scaled`), or `fixed_lr`."""

    base: str | None  # which base LR ("embedding_lr", ...); None: fixed_lr
    lr_multiplier: float
    dim_scaled: bool
    betas: tuple[float, float]
    weight_decay: float
    fixed_lr: float | None = None


ADAMW_GROUPS: dict[str, AdamWGroupSpec] = {
    "lm_head": AdamWGroupSpec("unembedding_lr", 1.0, True, (0.8, 0.96), 0.01),
    "wte": AdamWGroupSpec("embedding_lr", 1.0, True, (0.8, 0.995), 0.001),
    "value_embeds": AdamWGroupSpec("embedding_lr", 0.5, True, (0.8, 0.995), 0.01),
    # the residual multipliers scale the whole stream: tiny steps matter a lot
    "resid_lambdas": AdamWGroupSpec("scalar_lr", 0.01, False, (0.8, 0.95), 0.05),
    # a higher beta1 smooths the x0 mixing weights, which otherwise oscillate early in training
    "x0_lambdas": AdamWGroupSpec("scalar_lr", 1.0, False, (0.96, 0.95), 0.0),
    "smear_backout": AdamWGroupSpec(None, 1.0, False, (0.8, 0.95), 0.0, fixed_lr=0.2),
}

MUON_MOMENTUM = 0.95  # the group's starting value; the schedule below overwrites it every step
MUON_NS_STEPS = 5
MUON_BETA2 = 0.9  # NorMuon second-moment EMA; 1.0 freezes it (no variance reduction)


def adamw_dim_scale(n_embd: int) -> float:
    return (n_embd / ADAMW_REFERENCE_DIM) ** -0.5


# ---- schedules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """LR schedule of a run: linear warmup, constant, linear warmdown to a final fraction."""

    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("warmdown_ratio", self.warmdown_ratio, 0.0, 1.0)
        check_number("final_lr_frac", self.final_lr_frac, 0.0, 1.0)


DEFAULT_SCHEDULE = Schedule()

MOMENTUM_START = 0.85
MOMENTUM_PEAK = 0.97
MOMENTUM_END = 0.90
MOMENTUM_RAMP_STEPS = 400


def _check_step(step: int, num_iterations: int) -> None:
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if not 0 <= step <= num_iterations:
        raise ValueError(f"step must be in [0, num_iterations={num_iterations}], got {step}")


def warmdown_steps(num_iterations: int, warmdown_ratio: float) -> int:
    return round(warmdown_ratio * num_iterations)


def lr_multiplier(step: int, num_iterations: int, schedule: Schedule = DEFAULT_SCHEDULE) -> float:
    """(step+1)/warmup during warmup; 1; then linear to final_lr_frac over the warmdown.

    The warmup branch wins where a short run makes the two overlap (as in nanochat).
    """
    _check_step(step, num_iterations)
    warmdown = warmdown_steps(num_iterations, schedule.warmdown_ratio)
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if step <= num_iterations - warmdown:
        return 1.0
    remaining = (num_iterations - step) / warmdown
    return remaining + (1 - remaining) * schedule.final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float = DEFAULT_SCHEDULE.warmdown_ratio) -> float:
    """0.85 -> 0.97 over the first 400 steps; 0.97; 0.97 -> 0.90 across the LR warmdown.

    The ramp branch wins for step < 400, even inside the warmdown (as in nanochat).
    """
    _check_step(step, num_iterations)
    if step < MOMENTUM_RAMP_STEPS:
        frac = step / MOMENTUM_RAMP_STEPS
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    warmdown = warmdown_steps(num_iterations, warmdown_ratio)
    start = num_iterations - warmdown
    if warmdown > 0 and step >= start:
        progress = (step - start) / warmdown
        return MOMENTUM_PEAK * (1 - progress) + MOMENTUM_END * progress
    return MOMENTUM_PEAK


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Cosine from 1 at step 0 to 0 at the last step; applied to the Muon groups only."""
    _check_step(step, num_iterations)
    return 0.5 * (1.0 + math.cos(math.pi * step / num_iterations))


# ---- the depth dial -------------------------------------------------------------------------------

ASPECT_RATIO = 64  # model_dim = depth * aspect_ratio, rounded up to whole heads
HEAD_DIM = 128
SEQUENCE_LEN = 2048
WINDOW_PATTERN = "SSSL"
TARGET_PARAM_DATA_RATIO = 8.0  # training tokens per scaling parameter (speedrun)
REFERENCE_DEPTH = 12  # batch size, LRs and weight decay were tuned at d12 ...
REFERENCE_BATCH_TOKENS = 2**19  # ... with this many tokens per optimizer step
BATCH_EXPONENT = 0.383  # optimal batch size grows as D ** 0.383 (D = training tokens)


def optimal_batch_tokens(target_tokens: float, reference_tokens: float, micro_tokens: int) -> int:
    """B = B_ref * (D / D_ref) ** 0.383, to the nearest power of two, then to a multiple of one micro-step."""
    ideal = REFERENCE_BATCH_TOKENS * (target_tokens / reference_tokens) ** BATCH_EXPONENT
    power = 2 ** round(math.log2(max(ideal, 1.0)))
    return max(1, round(power / micro_tokens)) * micro_tokens


def lr_batch_scale(total_batch_tokens: int) -> float:
    """LRs scale with sqrt(B / B_ref) (the noise scale of the gradient)."""
    return math.sqrt(total_batch_tokens / REFERENCE_BATCH_TOKENS)


def scaled_weight_decay(weight_decay: float, total_batch_tokens: int, reference_tokens: float,
                        trained_tokens: float) -> float:
    """Keep B / (lr * wd * D) at its d12 value: wd * sqrt(B / B_ref) * D_ref / D."""
    return weight_decay * lr_batch_scale(total_batch_tokens) * reference_tokens / trained_tokens


# ---- presets --------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # GPU speedrun: depth sets model, batch, LRs and length (total_batch_size/num_iterations None = auto).
    "speedrun": dict(depth=20, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM, sequence_len=SEQUENCE_LEN,
                     device_batch_size=32, total_batch_size=None, num_iterations=None,
                     target_param_data_ratio=TARGET_PARAM_DATA_RATIO, eval_every=250, eval_tokens=20 * 2**19,
                     sample_every=2000, save_every=1000, scale_hyperparameters=True),
    # A few minutes on 2 CPU cores with the embedded corpus; still writes a usable checkpoint. The
    # scaling laws are fitted around 2**19-token batches and would shrink LRs ~16x at this batch size,
    # so the base hyperparameters are used unscaled.
    "cpu": dict(depth=4, aspect_ratio=32, head_dim=64, sequence_len=256, device_batch_size=8,
                total_batch_size=2048, num_iterations=300, target_param_data_ratio=TARGET_PARAM_DATA_RATIO,
                eval_every=100, eval_tokens=8 * 2048, sample_every=150, save_every=150,
                scale_hyperparameters=False),
}


# ---- supervised fine-tuning (nanochat's chat_sft) --------------------------------------------------
# Fine-tuning inherits the base run's sequence length, batch and LRs; these are its own numbers.

SFT_INIT_LR_FRAC = 0.8  # the LRs start at this fraction of the base run's peak LRs
SFT_WEIGHT_DECAY = 0.0  # pretraining's cosine has brought weight decay to zero; fine-tuning keeps it there


@dataclass(frozen=True)
class SFTSchedule:
    """LR multiplier by progress through the run (0 -> 1): fine-tuning often ends when its data does,
    so the schedule cannot be in steps. Linear warmup, constant, linear warmdown to final_lr_frac."""

    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        check_number("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_number("warmdown_ratio", self.warmdown_ratio, 0.0, 1.0)
        check_number("final_lr_frac", self.final_lr_frac, 0.0, 1.0)
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ValueError(f"warmup_ratio + warmdown_ratio must be <= 1, got {self.warmup_ratio} + "
                             f"{self.warmdown_ratio}")

    def lr_multiplier(self, progress: float) -> float:
        check_number("progress", progress, 0.0, 1.0)
        if progress < self.warmup_ratio:
            return progress / self.warmup_ratio
        if progress <= 1.0 - self.warmdown_ratio:
            return 1.0
        decay = (progress - (1.0 - self.warmdown_ratio)) / self.warmdown_ratio
        return (1 - decay) + decay * self.final_lr_frac


DEFAULT_SFT_SCHEDULE = SFTSchedule()

SFT_MOMENTUM_START = 0.85
SFT_MOMENTUM_END = 0.95
SFT_MOMENTUM_RAMP_STEPS = 300


def sft_muon_momentum(step: int) -> float:
    """0.85 -> 0.95 over the first 300 steps, then 0.95."""
    check_int("step", step, 0)
    frac = min(step / SFT_MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * SFT_MOMENTUM_START + frac * SFT_MOMENTUM_END


# The training mixtures, as task names of `nanochat_rs.tasks.registry` with their number of epochs.
# "nanochat" is nanochat's (multiple choice from MMLU, math and tool use from GSM8K); the synthetic
# mixture needs no download and teaches a skill a CPU-sized model can learn in minutes.
SFT_MIXTURES: dict[str, tuple[tuple[str, int], ...]] = {
    "nanochat": (("smoltalk", 1), ("identity", 2), ("mmlu", 3), ("gsm8k", 4), ("arithmetic", 1),
                 ("letter-count", 1)),
    "synthetic": (("arithmetic", 1), ("letter-count", 1), ("identity", 20)),
}

# Fine-tuning defaults by preset (speedrun with CUDA, cpu elsewhere); everything else is inherited.
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "speedrun": dict(mixture="nanochat", eval_every=200, eval_tokens=40 * 2**19, eval_examples=24,
                     save_every=1000),
    "cpu": dict(mixture="synthetic", eval_every=200, eval_tokens=16 * 2048, eval_examples=64, save_every=200),
}
