"""Token sampling and the argument checks shared by the naive `GPT.generate` and the `Engine`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["MAX_SEED", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "SamplingArgError", "check_prompt",
           "check_sampling_args", "sample_next_token"]

# Below MIN_TEMPERATURE, logits / T leaves the fp32 range (15 / 1e-40 is inf) and softmax turns into
# NaN; the argmax that such a temperature approaches is what temperature 0 already gives, exactly.
# Above MAX_TEMPERATURE the soft-capped logits (|l| <= 15) give a distribution uniform to within 0.3
# nats, and 1e308 (inf in fp32) would turn masked -inf logits into NaN.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1
"""Seeds are the unsigned 64-bit integers torch.Generator.manual_seed takes."""


class SamplingArgError(ValueError):
    """A sampling argument out of its range; `name` says which (e.g. for an HTTP error's `param`)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V) -> LongTensor (B,). Temperature 0 means argmax.

    Filters apply in the usual order: top-k on the logits, then temperature, then top-p (nucleus:
    the smallest set of most likely tokens whose probability reaches `top_p`; the best token always
    stays).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # a token is dropped once the more likely tokens before it already reach top_p
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        dropped = mass_before >= top_p
        # the best token's mass_before is 0, which a top_p below fp32's smallest float also rounds
        # to: keep it explicitly, or every token would be dropped and multinomial would fail
        dropped[:, 0] = False
        sorted_probs = sorted_probs.masked_fill(dropped, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
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
                        max_tokens_optional: bool = False, top_p: object = None) -> None:
    """Validate the sampling knobs; `max_tokens=None` is allowed only where the caller has a default.

    The one home of these rules: the Engine, `GPT.generate` and the chat job all check here.
    """
    if not (max_tokens is None and max_tokens_optional) and (not _is_int(max_tokens) or max_tokens < 0):
        expected = "a non-negative int or None" if max_tokens_optional else "a non-negative int"
        raise SamplingArgError("max_tokens", f"max_tokens must be {expected}, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise SamplingArgError("temperature", f"temperature must be a finite number >= 0, got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise SamplingArgError("temperature", f"temperature {temperature!r} is below {MIN_TEMPERATURE}, where "
                               "sampling breaks down numerically; use 0 for greedy decoding")
    if temperature > MAX_TEMPERATURE:
        raise SamplingArgError("temperature", f"temperature {temperature!r} is above {MAX_TEMPERATURE:g}, where "
                               "sampling is uniform noise; use a value between 0 (greedy) and about 2")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise SamplingArgError("top_k", f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, int | float):
            raise TypeError(f"top_p must be a number or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:  # also rejects NaN
            raise SamplingArgError("top_p", f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise SamplingArgError("seed", f"seed must fit in 64 bits (0 <= seed < 2**64), got {seed}")
