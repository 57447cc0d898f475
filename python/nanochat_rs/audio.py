"""Audio soft tokens (W1): project Whisper encoder features into the GPT's embedding space.

LLaVA-style: `stack` consecutive encoder frames are concatenated (shortening the sequence by that
factor, Whisper's 50 frames/s is far denser than text needs), then a 2-layer MLP maps them to
n_embd. The result is what `GPT.forward(..., audio_features=...)` takes; the projector is kept out of
the GPT so text-only checkpoints and code never see it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_rs.common import compute_dtype
from nanochat_rs.gpt import Linear

__all__ = ["Projector", "stack_frames"]


def stack_frames(frames: torch.Tensor, stack: int, drop_remainder: bool = True) -> torch.Tensor:
    """(B, T_frames, D) -> (B, T_frames // stack, stack * D); output row j = frames j*stack .. j*stack+stack-1.

    Trailing frames that do not fill a whole group are dropped, or rejected when drop_remainder=False.
    """
    if isinstance(stack, bool) or not isinstance(stack, int) or stack < 1:
        raise ValueError(f"stack must be a positive int, got {stack!r}")
    if not isinstance(frames, torch.Tensor) or frames.dim() != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a tensor of shape (B, T_frames, D), got {shape}")
    batch, num_frames, dim = frames.shape
    remainder = num_frames % stack
    if num_frames < stack:
        raise ValueError(f"need at least stack={stack} frames to make one audio token, got {num_frames}")
    if remainder and not drop_remainder:
        raise ValueError(f"{num_frames} frames is not a multiple of stack={stack} "
                         f"({remainder} left over); trim them or use drop_remainder=True")
    usable = num_frames - remainder
    return frames[:, :usable].reshape(batch, usable // stack, stack * dim)


class Projector(nn.Module):
    """Whisper features (B, T_frames, in_dim) -> audio soft tokens (B, T_frames // stack, n_embd)."""

    def __init__(self, in_dim: int, n_embd: int, stack: int = 4, hidden_mult: int = 4,
                 drop_remainder: bool = True) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("n_embd", n_embd), ("stack", stack), ("hidden_mult", hidden_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_dim, self.n_embd, self.stack = in_dim, n_embd, stack
        self.drop_remainder = drop_remainder
        hidden = hidden_mult * n_embd
        self.fc1 = Linear(stack * in_dim, hidden, bias=True)
        self.fc2 = Linear(hidden, n_embd, bias=True)

    def num_tokens(self, num_frames: int) -> int:
        """Audio positions the GPT will see for `num_frames` encoder frames."""
        return num_frames // self.stack

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            raise TypeError("features must be a floating-point tensor (B, T_frames, in_dim)")
        if features.dim() != 3 or features.size(-1) != self.in_dim:
            raise ValueError(f"features must have shape (B, T_frames, in_dim={self.in_dim}), "
                             f"got {tuple(features.shape)}")
        x = stack_frames(features.to(compute_dtype()), self.stack, self.drop_remainder)
        return self.fc2(F.gelu(self.fc1(x)))
