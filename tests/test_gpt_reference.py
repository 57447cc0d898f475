"""Differential spec for GPT.forward: a slow float64 re-implementation of DESIGN.md "Model", written
straight from the spec with explicit loops, must produce the model's logits.

Every parameter is randomised first (the real init zeroes output projections, smear and sets
backout small, which would let whole features go untested).
"""

from __future__ import annotations

import math

import torch
from model_helpers import random_gpt
from nanochat_rs.gpt import GPT, GPTConfig

CONFIG = GPTConfig(sequence_len=256, vocab_size=100, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                   window_pattern="SL")


def random_model(config: GPTConfig = CONFIG, seed: int = 0) -> GPT:
    return random_gpt(config, seed)


def rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + torch.finfo(torch.float32).eps)


def rotate(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rotary: channel pair (j, j + D/2) at position p turned by angle p * 100000^(-2j/D)."""
    dim = x.size(-1)
    half = dim // 2
    out = x.clone()
    for t, p in enumerate(positions):
        for j in range(half):
            angle = p * 100000.0 ** (-2 * j / dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, t, :, j], x[:, t, :, j + half]
            out[:, t, :, j] = a * c + b * s
            out[:, t, :, j + half] = b * c - a * s
    return out


def spec_windows(config: GPTConfig) -> list[int]:
    short = min(128 * math.ceil(config.sequence_len / 4 / 128), config.sequence_len)
    kinds = [config.window_pattern[i % len(config.window_pattern)] for i in range(config.n_layer)]
    kinds[-1] = "L"
    return [config.sequence_len if kind == "L" else short for kind in kinds]


def reference_logits(model: GPT, idx: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
    cfg = model.config
    p = {name: t.detach().double() for name, t in model.named_parameters()}
    heads, kv_heads, dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    batch, t_text = idx.shape

    emb = rms(p["transformer.wte.weight"][idx])
    x = emb.clone()
    for t in range(1, t_text):  # smear: position 0 gets nothing
        gate = torch.sigmoid(emb[:, t, :24] @ p["smear_gate.weight"].T)
        x[:, t] = emb[:, t] + p["smear_lambda"] * gate * emb[:, t - 1]
    ids = idx
    if audio is not None:
        x = torch.cat((rms(audio.double()), x), dim=1)
        ids = torch.cat((torch.zeros(batch, audio.size(1), dtype=idx.dtype), idx), dim=1)
    t_full = x.size(1)
    positions = list(range(t_full))
    x0 = x
    windows = spec_windows(cfg)
    x_mid = None
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ p[pre + "attn.c_q.weight"].T).view(batch, t_full, heads, dim)
        k = (h @ p[pre + "attn.c_k.weight"].T).view(batch, t_full, kv_heads, dim)
        v = (h @ p[pre + "attn.c_v.weight"].T).view(batch, t_full, kv_heads, dim)
        if (cfg.n_layer - 1 - i) % 2 == 0:  # value embedding on alternating layers ending at the last
            gate = 3 * torch.sigmoid(h[..., :12] @ p[pre + "attn.ve_gate.weight"].T)
            v = v + gate.unsqueeze(-1) * p[f"value_embeds.{i}.weight"][ids].view(batch, t_full, kv_heads, dim)
        q = rms(rotate(q, positions)) * 1.2
        k = rms(rotate(k, positions)) * 1.2
        y = torch.zeros_like(q)
        for t in range(t_full):
            keys = [j for j in range(t + 1) if t - j <= windows[i]]
            for hd in range(heads):
                g = hd // (heads // kv_heads)
                scores = torch.einsum("bkd,bd->bk", k[:, keys, g], q[:, t, hd]) / math.sqrt(dim)
                y[:, t, hd] = torch.einsum("bk,bkd->bd", torch.softmax(scores, dim=-1), v[:, keys, g])
        x = x + y.reshape(batch, t_full, -1) @ p[pre + "attn.c_proj.weight"].T
        hidden = torch.relu(rms(x) @ p[pre + "mlp.c_fc.weight"].T).square()
        x = x + hidden @ p[pre + "mlp.c_proj.weight"].T
        if i == cfg.n_layer // 2:
            x_mid = x
    assert x_mid is not None
    x = x - p["backout_lambda"] * x_mid
    logits = rms(x) @ p["lm_head.weight"][: cfg.vocab_size].T
    return 15 * torch.tanh(logits / 15)


def test_forward_matches_the_spec_reference_across_the_sliding_window() -> None:
    model = random_model()
    assert model.window_sizes == spec_windows(CONFIG) == [128, 256, 128, 256]
    idx = torch.randint(0, 100, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape == (2, 150, 100)
    torch.testing.assert_close(logits.double(), reference_logits(model, idx), atol=2e-4, rtol=1e-4)


def test_forward_with_audio_matches_the_spec_reference() -> None:
    """Audio: normed, after smear, rotary 0..T_a-1 then text, value-embedding id 0 at audio rows."""
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       window_pattern="L")
    model = random_model(config, seed=5)
    idx = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    audio = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        logits = model(idx, audio_features=audio)
    assert logits.shape == (2, 27, 100)
    torch.testing.assert_close(logits.double(), reference_logits(model, idx, audio), atol=2e-4, rtol=1e-4)
