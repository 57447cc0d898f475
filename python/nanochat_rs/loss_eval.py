"""Validation loss in bits per byte: comparable across tokenizers and vocabulary sizes.

Mean cross-entropy per token depends on how much text a token covers, so it cannot compare models with
different tokenizers. Bits per byte can: total loss in nats over the graded target tokens, divided by
ln(2) times the number of UTF-8 bytes those tokens stand for. Special tokens stand for 0 bytes and are
left out of both sums (as are ignore_index=-1 targets, e.g. audio positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from nanochat_rs.common import is_ddp_initialized


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _next_batch(batches: Iterator[Any], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        batch = next(batches)
    except StopIteration:
        raise ValueError(f"evaluate_bpb: the batch iterator ran out after {step} batches") from None
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        raise TypeError("evaluate_bpb: each batch must be a tuple (inputs, targets, ...)")
    return batch[0], batch[1]


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterator[Any], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over the next `steps` batches of `batches`.

    `batches` yields (inputs, targets, ...) as the dataloader does; `token_bytes[i]` is the number of
    bytes token i decodes to (0 for special tokens). The sums are all-reduced across ranks when a process
    group is initialised, so every rank returns the same global value.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1:
        raise TypeError("token_bytes must be a 1-D tensor of byte counts per token id")
    device = next(model.parameters()).device
    acc_dtype = _accumulator_dtype(device)
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    vocab = token_bytes.numel()
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            inputs, targets = _next_batch(batches, step)
            targets = targets.to(device)
            losses = model(inputs.to(device), targets, loss_reduction="none").reshape(-1)
            targets = targets.reshape(-1)
            if targets.numel() and int(targets.max()) >= vocab:
                raise ValueError(f"target id {int(targets.max())} is outside token_bytes (length {vocab})")
            if losses.shape != targets.shape:
                raise ValueError(f"per-token losses have shape {tuple(losses.shape)}, "
                                 f"targets {tuple(targets.shape)}")
            graded = targets >= 0
            nbytes = torch.where(graded, token_bytes[targets.clamp(min=0)], 0)
            counted = nbytes > 0
            # where() rather than multiply: a masked position must not leak inf/nan into the sum.
            total_nats += torch.where(counted, losses.to(acc_dtype), 0).sum()
            total_bytes += nbytes.sum()
    finally:
        model.train(was_training)
    if is_ddp_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    num_bytes = int(total_bytes.item())
    if num_bytes == 0:
        raise ValueError("evaluate_bpb: the batches contain no target tokens that stand for any bytes")
    return float(total_nats.item()) / (math.log(2) * num_bytes)
