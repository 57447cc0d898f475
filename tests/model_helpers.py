"""Tiny GPTs for the model tests (imported by test modules; not a test file itself)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nanochat_rs.gpt import GPT, GPTConfig, build_model


def build_gpt(config: GPTConfig) -> GPT:
    """The production recipe, on CPU."""
    return build_model(config, "cpu")


def randomise(model: GPT, seed: int = 0) -> GPT:
    """Every parameter random: the real init zeroes output projections and smear and sets backout
    small, which would let whole features (and cache bugs) go untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = param.shape[-1] ** -0.5 if param.dim() >= 2 else 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def random_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT built the production way, then fully randomised, in eval mode."""
    return randomise(build_gpt(config), seed).eval()


def record_fed_tokens(model: GPT, monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """Spy on the model: every forward's input ids, as nested lists."""
    fed: list[list[list[int]]] = []
    original = model.forward

    def forward(idx: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fed.append(idx.tolist())
        return original(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return fed
