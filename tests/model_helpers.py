"""Tiny GPTs for the model tests (imported by test modules; not a test file itself)."""

from __future__ import annotations

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
