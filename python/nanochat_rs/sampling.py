"""Token sampling and the argument checks shared by the naive `GPT.generate` and the `Engine`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_prompt", "check_sampling_args", "sample_next_token"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V) -> LongTensor (B,). Temperature 0 means argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_prompt(tokens: object, vocab_size: int) -> list[int]:
    """The prompt as a fresh list of token ids, or a clear TypeError/ValueError."""
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens must be a list of token ids, got {type(tokens).__name__}")
    prompt = list(tokens)
    if not prompt:
        raise ValueError("tokens is empty: generation needs at least one prompt token (e.g. BOS)")
    for i, token in enumerate(prompt):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise ValueError(f"tokens[{i}] = {token!r} is not a token id in [0, {vocab_size})")
    return prompt


def check_sampling_args(max_tokens: object, temperature: object, top_k: object, seed: object, *,
                        max_tokens_optional: bool = False) -> None:
    """Validate the sampling knobs; `max_tokens=None` is allowed only where the caller has a default."""
    if not (max_tokens is None and max_tokens_optional) and (not _is_int(max_tokens) or max_tokens < 0):
        expected = "a non-negative int or None" if max_tokens_optional else "a non-negative int"
        raise ValueError(f"max_tokens must be {expected}, got {max_tokens!r}")
    # inf would turn every logit into 0 (or NaN next to a top-k mask) rather than mean "uniform"
    if (isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature >= 0
            or not math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
