"""Memory estimates, so an impossible configuration is refused up front with the figure, before
anything is allocated (instead of an out-of-memory kill or a CUDA error hours into a run)."""

from __future__ import annotations

import os

import torch

from nanochat_rs.gpt import GPT, ROTARY_OVERALLOCATION, GPTConfig

# Training keeps per parameter: the fp32 master weight, its gradient and about two fp32 state
# tensors (Adam's two moments; Muon's momentum plus a small factored second moment).
TRAIN_BYTES_PER_PARAM = 16
INFERENCE_BYTES_PER_PARAM = 4
# Saved activations per token and layer, in units of n_embd elements: the residual stream, norms,
# q/k/v/attention output and the 4x MLP input and its ReLU^2 output, with some headroom.
ACTIVATION_WIDTHS_PER_LAYER = 24
# fp32 logits, their soft-capped copy and the gradient of each, per token and vocabulary entry.
LOGIT_COPIES = 4


def num_parameters(config: GPTConfig) -> int:
    """Counted on the meta device: no memory is touched."""
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config).parameters())


def _rotary_bytes(config: GPTConfig) -> int:
    return 2 * ROTARY_OVERALLOCATION * config.sequence_len * (config.head_dim // 2) * 4


def inference_memory_bytes(config: GPTConfig) -> int:
    return num_parameters(config) * INFERENCE_BYTES_PER_PARAM + _rotary_bytes(config)


def checkpoint_bytes(config: GPTConfig) -> int:
    """Disk for one training checkpoint: fp32 weights plus about two fp32 optimizer tensors per
    parameter, and a megabyte for the tokenizer and metadata."""
    return num_parameters(config) * 4 * 3 + (1 << 20)


def training_memory_bytes(config: GPTConfig, device_batch_size: int) -> int:
    """A lower bound on what one training micro-step needs on the device (rough, never generous)."""
    tokens = device_batch_size * config.sequence_len
    activation_bytes = 4  # fp32 on CPU; bf16 halves it but the logits stay fp32
    activations = tokens * config.n_layer * config.n_embd * ACTIVATION_WIDTHS_PER_LAYER * activation_bytes
    logits = tokens * config.vocab_size * 4 * LOGIT_COPIES
    return num_parameters(config) * TRAIN_BYTES_PER_PARAM + _rotary_bytes(config) + activations + logits


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (None where it cannot be asked, e.g. MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """ValueError when `needed` bytes clearly exceed the free memory of `device`."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ValueError(f"{what} needs at least {format_bytes(needed)} on {device.type}, but only "
                         f"{format_bytes(free)} is free; choose a smaller model, batch or sequence length")
