"""The GPT: a small modern decoder-only transformer.

Architecture (see DESIGN.md "Model"):
  token ids -> wte -> RMSNorm -> smear (previous token mixed in through a gate)
  [-> prepend normed audio soft tokens]                                   = x0
  per layer i:  x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                x = x + attn(norm(x))    rotary (base 100000) + QK-norm * 1.2, GQA, sliding window,
                                         value embeddings mixed into v on alternating layers
                x = x + mlp(norm(x))     ReLU^2, 4x
  x = x - backout_lambda * x_mid         (x_mid = residual after layer n_layer // 2)
  logits = 15 * tanh(lm_head(norm(x)) / 15), in fp32, cropped to vocab_size

Precision: master weights are fp32 except the embedding tables (stored in COMPUTE_DTYPE to halve
their memory); every Linear casts its weight to the activation dtype, so no autocast is needed.
Construction is meta-device friendly: `GPT(config)` under `torch.device("meta")`, then
`model.to_empty(device=...)` and `model.init_weights()` (which also fills the rotary tables).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_rs.attention import flash_attn_func, flash_attn_with_kvcache
from nanochat_rs.common import compute_dtype
from nanochat_rs.kv_cache import KVCache, PagedRows
from nanochat_rs.recipe import ASPECT_RATIO, HEAD_DIM, SEQUENCE_LEN, WINDOW_PATTERN
from nanochat_rs.sampling import check_prompt, check_sampling_args, sample_next_token
from nanochat_rs.util import check_int

if TYPE_CHECKING:
    from nanochat_rs.optim import MuonAdamW

__all__ = ["GPT", "GPTConfig", "Linear", "build_model", "config_for_depth", "compute_window_sizes",
           "padded_vocab_size"]

ROTARY_BASE = 100_000
ROTARY_OVERALLOCATION = 10  # rotary tables cover 10x sequence_len (audio prefixes, long decodes)
QK_SCALE = 1.2  # q and k are rescaled after QK-norm: unit-RMS vectors give too flat attention
SOFTCAP = 15.0
VOCAB_MULTIPLE = 64
WINDOW_MULTIPLE = 128
VE_GATE_CHANNELS = 12  # value-embedding gate reads only the first channels of the normed input
SMEAR_CHANNELS = 24  # so does the smear gate (cheap; enough to recognise the token)
MLP_RATIO = 4

# what forward(kv_cache=...) takes: a lockstep cache, or some slots of a paged pool with per-row positions
AnyKVCache = KVCache | PagedRows


@dataclass
class GPTConfig:
    sequence_len: int = SEQUENCE_LEN
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = WINDOW_PATTERN

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            check_int(f"GPTConfig.{name}", getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) for GQA")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = n_embd / n_head = {self.head_dim} must be even for rotary embeddings")
        if self.n_embd < SMEAR_CHANNELS:
            raise ValueError(f"n_embd must be at least {SMEAR_CHANNELS} (the smear gate reads that many "
                             f"channels), got {self.n_embd}")
        if not isinstance(self.window_pattern, str) or not self.window_pattern or set(self.window_pattern) - {"L", "S"}:
            raise ValueError(f"window_pattern must be a non-empty string of 'L' (full context) and 'S' "
                             f"(quarter context) characters, got {self.window_pattern!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, head_dim: int = HEAD_DIM,
                     aspect_ratio: int = ASPECT_RATIO, window_pattern: str = WINDOW_PATTERN) -> GPTConfig:
    """The one-dial sizing: model_dim = depth * aspect_ratio rounded up to whole heads of `head_dim`."""
    for name, value in (("depth", depth), ("head_dim", head_dim), ("aspect_ratio", aspect_ratio)):
        check_int(name, value, 1)
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)


def padded_vocab_size(vocab_size: int) -> int:
    """Embedding/lm_head rows rounded up to a multiple of 64 (tensor-core friendly shapes)."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def compute_window_sizes(config: GPTConfig) -> list[int]:
    """Left attention window per layer: the pattern tiled over layers, final layer always 'L'.

    L = sequence_len (the whole training context); S = a quarter of it rounded up to a multiple of 128
    (kernel block friendly), never more than sequence_len.
    """
    long_window = config.sequence_len
    short_window = min(math.ceil(config.sequence_len / 4 / WINDOW_MULTIPLE) * WINDOW_MULTIPLE, long_window)
    pattern = config.window_pattern
    kinds = [pattern[i % len(pattern)] for i in range(config.n_layer)]
    kinds[-1] = "L"
    return [long_window if kind == "L" else short_window for kind in kinds]


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers, counted from the last one (which always has one)."""
    return (n_layer - 1 - layer_idx) % 2 == 0


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (j, j + D/2) of x (B, T, H, D) by the angles whose cos/sin are (1, T, 1, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def rotary_tables(length: int, head_dim: int, device: torch.device | str | None = None,
                  base: float = ROTARY_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (1, length, 1, head_dim/2): computed in fp32, stored in COMPUTE_DTYPE."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    dtype = compute_dtype()
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return cos[None, :, None, :], sin[None, :, None, :]


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the activation dtype on the fly (no autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = (Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                window: int, kv_cache: AnyKVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None and self.ve_gate is not None:
            # ResFormer: each kv-head decides (per token) how much of the token's value embedding to take
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q = norm(apply_rotary(q, cos, sin)) * QK_SCALE
        k = norm(apply_rotary(k, cos, sin)) * QK_SCALE
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        elif isinstance(kv_cache, PagedRows):
            k_pages, v_pages = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_pages, v_pages, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                        causal=True, window_size=(window, 0), page_table=kv_cache.page_table,
                                        host_seqlens=kv_cache.lengths)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            # every row of our cache sits at the same position, known on the host: no device sync
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                        causal=True, window_size=(window, 0), uniform_seqlen=kv_cache.get_pos())
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, MLP_RATIO * config.n_embd, bias=False)
        self.c_proj = Linear(MLP_RATIO * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                window: int, kv_cache: AnyKVCache | None) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.padded_vocab_size = padded_vocab_size(config.vocab_size)
        self.window_sizes = compute_window_sizes(config)
        self.backout_layer = config.n_layer // 2
        kv_dim = config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(self.padded_vocab_size, config.n_embd, dtype=compute_dtype()),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(self.padded_vocab_size, kv_dim, dtype=compute_dtype())
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        # shape (1,), not 0-d: nanochat's state dicts use (1,), and checkpoints convert both ways
        self.smear_lambda = nn.Parameter(torch.empty(1))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        # non-persistent: derived data, recomputed by init_weights (to_empty leaves them garbage)
        cos, sin = rotary_tables(ROTARY_OVERALLOCATION * config.sequence_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # ---- initialisation ------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        config = self.config
        n_embd = config.n_embd
        bound = math.sqrt(3.0) / math.sqrt(n_embd)  # uniform(-b, b) has std b / sqrt(3) = 1 / sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.zeros_(mlp.c_proj.weight)
            if attn.ve_gate is not None:
                # small positive: the gate starts near 3 * sigmoid(0) = 1.5, i.e. value embeddings on
                nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)
        for embedding in self.value_embeds.values():
            # on the scale of c_v's output for a unit-RMS input, so v starts as a balanced mix
            nn.init.uniform_(embedding.weight, -bound, bound)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, config.n_layer))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, config.n_layer))
        # smear starts off (lambda 0): the step-0 model is a plain transformer and the bigram shortcut
        # grows only as far as it helps; the gate still sees gradient through lambda from step 0.
        self.smear_lambda.fill_(0.0)
        # backout starts mild: at init the blocks output zero, so x_mid is a multiple of x0 and
        # removing 0.2 of it is a small rescale the final norm absorbs, a safe non-zero start.
        self.backout_lambda.fill_(0.2)
        cos, sin = rotary_tables(self.cos.size(1), config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: AnyKVCache | None = None,
                loss_reduction: str = "mean", *, audio_features: torch.Tensor | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T_full, vocab_size) in fp32 without targets, else the cross-entropy loss.

        T_full = T_audio + T_text. With a KV cache the chunk is appended at the cache position and
        the cache is advanced by T once all layers have written their keys/values; with `PagedRows`
        each row is appended at its own position. `last_only=True` returns only the last position's
        logits (B, 1, vocab_size): all that sampling needs, and it spares a prompt prefill the
        T x vocab readout. `logits_at`, a boolean mask (B, T_full), returns the logits of its True
        positions only, flattened in row-major order to (num_true, vocab_size): the readout is paid
        only where logits are wanted.
        """
        self._check_idx(idx)
        if last_only and targets is not None:
            raise ValueError("last_only=True returns logits; it cannot be combined with targets")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        B, T_text = idx.shape
        T_audio = self._check_audio(audio_features, B, kv_cache)
        T_full = T_audio + T_text
        self._check_logits_at(logits_at, B, T_full, targets, last_only)
        start = 0 if kv_cache is None else self._check_cache(kv_cache, B, T_full)
        if start + T_full > self.cos.size(1):
            raise ValueError(f"{start + T_full} positions exceed the rotary table of {self.cos.size(1)} "
                             f"(10 x sequence_len={self.config.sequence_len})")
        if targets is not None:
            targets = self._align_targets(targets, B, T_text, T_audio)

        x = self._embed_text(idx, kv_cache)
        ve_idx = idx
        if audio_features is not None:
            # after smear: smear is a text-side op, its previous-token rule is undefined for soft tokens
            x = torch.cat((norm(audio_features).to(x.dtype), x), dim=1)
            ve_idx = F.pad(idx, (T_audio, 0), value=0)  # dummy id 0 at audio positions
        x = self._run_blocks(x, ve_idx, start, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T_full)
        if last_only:
            x = x[:, -1:]
        if logits_at is not None:
            x = x[logits_at]
        return self._head(x, targets, loss_reduction)

    def _embed_text(self, idx: torch.Tensor, kv_cache: AnyKVCache | None) -> torch.Tensor:
        """wte -> norm -> smear: x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1]."""
        x = norm(self.transformer.wte(idx))
        if isinstance(kv_cache, PagedRows):
            # every row has a previous embedding: a row at position 0 has zero, which adds nothing
            previous = torch.cat((kv_cache.prev_embedding.to(x.dtype), x[:, :-1]), dim=1)
            kv_cache.set_prev_embedding(x[:, -1:])
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            return x + gate * previous
        previous = x[:, :-1]
        if kv_cache is not None and kv_cache.get_pos() > 0:
            if kv_cache.prev_embedding is None:
                raise ValueError("the KV cache is past position 0 but holds no smear state (prev_embedding); "
                                 "fill caches only through GPT.forward or KVCache.prefill")
            previous = torch.cat((kv_cache.prev_embedding.to(x.dtype), previous), dim=1)
        if kv_cache is not None:
            kv_cache.set_prev_embedding(x[:, -1:])
        if previous.size(1) == 0:
            return x
        current = x[:, -previous.size(1):]
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(current[..., :SMEAR_CHANNELS]))
        smeared = current + gate * previous
        return torch.cat((x[:, :x.size(1) - previous.size(1)], smeared), dim=1)

    def _run_blocks(self, x: torch.Tensor, ve_idx: torch.Tensor, start: int,
                    kv_cache: AnyKVCache | None) -> torch.Tensor:
        T = x.size(1)
        if isinstance(kv_cache, PagedRows):
            positions = kv_cache.positions(T)  # (B, T): each row at its own position
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        else:
            cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]
        x0 = x
        x_mid = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](ve_idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.backout_layer:
                x_mid = x
        # backout: drop part of the mid-depth residual, whose low-level features hurt the readout
        return x - self.backout_lambda.to(x.dtype) * x_mid

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None, loss_reduction: str) -> torch.Tensor:
        logits = self.lm_head(norm(x))[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    # ---- input validation ----------------------------------------------------------------------

    @staticmethod
    def _check_idx(idx: Any) -> None:
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a LongTensor (B, T), got {type(idx).__name__}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")

    @staticmethod
    def _check_logits_at(logits_at: Any, batch: int, T_full: int, targets: Any, last_only: bool) -> None:
        if logits_at is None:
            return
        if targets is not None or last_only:
            raise ValueError("logits_at selects which logits are returned; it cannot be combined with targets "
                             "or last_only")
        if (not isinstance(logits_at, torch.Tensor) or logits_at.dtype != torch.bool
                or tuple(logits_at.shape) != (batch, T_full)):
            got = (f"{logits_at.dtype} {tuple(logits_at.shape)}" if isinstance(logits_at, torch.Tensor)
                   else type(logits_at).__name__)
            raise ValueError(f"logits_at must be a torch.bool mask of shape (B={batch}, T_full={T_full}), got {got}")

    def _check_audio(self, audio: Any, batch: int, kv_cache: AnyKVCache | None) -> int:
        if audio is None:
            return 0
        if kv_cache is not None:
            raise ValueError("audio_features cannot be combined with a KV cache: cached prefill/decode has no "
                             "audio-aware semantics yet; run audio prefixes as a full (train-style) forward")
        if not isinstance(audio, torch.Tensor) or not audio.dtype.is_floating_point:
            raise TypeError("audio_features must be a floating-point tensor (B, T_audio, n_embd)")
        if audio.dim() != 3 or audio.size(0) != batch or audio.size(2) != self.config.n_embd:
            raise ValueError(f"audio_features must have shape (B={batch}, T_audio, n_embd={self.config.n_embd}) "
                             f"(already projected by audio.Projector), got {tuple(audio.shape)}")
        return audio.size(1)

    def _check_cache(self, kv_cache: Any, batch: int, T: int) -> int:
        """The furthest row's position, once the cache is known to fit the input."""
        if not isinstance(kv_cache, KVCache | PagedRows):
            raise TypeError(f"kv_cache must be a KVCache or PagedRows, got {type(kv_cache).__name__}")
        config = self.config
        expected = (batch, config.n_layer, config.n_kv_head, config.head_dim)
        actual = (kv_cache.batch_size, kv_cache.num_layers, kv_cache.num_kv_heads, kv_cache.head_dim)
        if actual != expected:
            raise ValueError(f"KV cache (batch, layers, kv heads, head_dim) = {actual} does not fit this input "
                             f"and model: expected {expected}")
        if isinstance(kv_cache, PagedRows):
            if T > kv_cache.remaining():
                raise ValueError(f"{T} new tokens do not fit the KV cache: a row has room for only "
                                 f"{kv_cache.remaining()} more positions")
            return max(kv_cache.lengths)
        if T > kv_cache.remaining():
            raise ValueError(f"{T} new tokens do not fit the KV cache: {kv_cache.get_pos()} of "
                             f"{kv_cache.max_seq_len} positions are used")
        return kv_cache.get_pos()

    @staticmethod
    def _align_targets(targets: Any, batch: int, T_text: int, T_audio: int) -> torch.Tensor:
        """Text-length targets are left-padded with -1 over the audio positions; full-length ones pass."""
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.size(0) != batch:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a (B={batch}, T) tensor, got {shape}")
        if targets.size(1) == T_audio + T_text:
            return targets
        if T_audio and targets.size(1) == T_text:
            return F.pad(targets, (T_audio, 0), value=-1)
        allowed = f"{T_text} or {T_audio + T_text}" if T_audio else f"{T_text}"
        raise ValueError(f"targets have length {targets.size(1)}, expected {allowed} (text length"
                         f"{', or audio + text' if T_audio else ''})")

    # ---- accounting ----------------------------------------------------------------------------

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by role; 'matrix' + 'lm_head' is the N of the scaling laws."""
        def count(params: Any) -> int:
            return sum(p.numel() for p in params)

        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": count(self.value_embeds.parameters()),
            "matrix": count(self.transformer.h.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "scalars": count(self._scalar_params()),
        }
        counts["embedding"] = counts["wte"] + counts["value_embeds"]
        counts["total"] = count(self.parameters())
        assert counts["total"] == sum(counts[k] for k in ("embedding", "matrix", "lm_head", "scalars"))
        return counts

    def _scalar_params(self) -> list[nn.Parameter]:
        return [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) plus attention scores/values.

        Embedding lookups and per-layer scalars cost no matmul FLOPs. Attention costs 12 * H * D per
        attended key per layer (QK^T and AV, 2 FLOPs per MAC, times 3 for fwd + bwd); a sliding-window
        layer attends at most `window` keys.
        """
        counts = self.num_scaling_params()
        matmul_params = counts["total"] - counts["embedding"] - counts["scalars"]
        config = self.config
        attention = sum(12 * config.n_head * config.head_dim * min(window, config.sequence_len)
                        for window in self.window_sizes)
        return float(6 * matmul_params + attention)

    # ---- optimizer -------------------------------------------------------------------------------

    def setup_optimizer(self, unembedding_lr: float | None = None, embedding_lr: float | None = None,
                        matrix_lr: float | None = None, weight_decay: float | None = None,
                        scalar_lr: float | None = None, *, compiled_step: bool = False) -> MuonAdamW:
        """The optimizer exactly as the training job builds it (nanochat's signature; None = the
        recipe's value): Muon for the block matrices, one group per shape; AdamW groups for lm_head,
        wte, value embeddings, resid_lambdas, x0_lambdas and the smear/backout scalars, with the
        betas, weight decays and LR multipliers of `nanochat_rs.recipe.ADAMW_GROUPS`."""
        from nanochat_rs import recipe
        from nanochat_rs.optim import MuonAdamW

        base_lrs = {
            "embedding_lr": recipe.EMBEDDING_LR if embedding_lr is None else embedding_lr,
            "unembedding_lr": recipe.UNEMBEDDING_LR if unembedding_lr is None else unembedding_lr,
            "scalar_lr": recipe.SCALAR_LR if scalar_lr is None else scalar_lr,
        }
        dim_scale = recipe.adamw_dim_scale(self.config.n_embd)
        members: dict[str, list[nn.Parameter]] = {
            "lm_head": [self.lm_head.weight],
            "wte": [self.transformer.wte.weight],
            "value_embeds": list(self.value_embeds.parameters()),
            "resid_lambdas": [self.resid_lambdas],
            "x0_lambdas": [self.x0_lambdas],
            "smear_backout": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
        }
        groups: list[dict[str, Any]] = []
        for name, spec in recipe.ADAMW_GROUPS.items():
            if spec.base is None:
                assert spec.fixed_lr is not None
                lr = spec.fixed_lr
            else:
                lr = base_lrs[spec.base] * spec.lr_multiplier * (dim_scale if spec.dim_scaled else 1.0)
            groups.append({"kind": "adamw", "name": name, "params": members[name], "lr": lr, "betas": spec.betas,
                           "eps": recipe.ADAMW_EPS, "weight_decay": spec.weight_decay})
        by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for param in self.transformer.h.parameters():
            by_shape.setdefault(tuple(param.shape), []).append(param)
        for shape in sorted(by_shape):
            groups.append({"kind": "muon", "name": f"matrix{shape}", "params": by_shape[shape],
                           "lr": recipe.MATRIX_LR if matrix_lr is None else matrix_lr,
                           "momentum": recipe.MUON_MOMENTUM, "ns_steps": recipe.MUON_NS_STEPS,
                           "beta2": recipe.MUON_BETA2,
                           "weight_decay": recipe.WEIGHT_DECAY if weight_decay is None else weight_decay})
        grouped = sum(len(group["params"]) for group in groups)
        assert grouped == len(list(self.parameters())), "every parameter belongs to exactly one group"
        return MuonAdamW(groups, compiled_step=compiled_step)

    # ---- naive generation --------------------------------------------------------------------------

    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Reference sampler: recomputes the full forward for every token (no KV cache).

        Yields one token id at a time; temperature 0 is greedy argmax. Validation happens on the call,
        not on the first next().
        """
        prompt = check_prompt(tokens, self.config.vocab_size)
        check_sampling_args(max_tokens, temperature, top_k, seed)
        if len(prompt) + max_tokens > self.cos.size(1) + 1:
            raise ValueError(f"{len(prompt)} prompt + {max_tokens} new tokens exceed the rotary table of "
                             f"{self.cos.size(1)} positions")
        return self._generate(prompt, max_tokens, float(temperature), top_k, seed)

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float, top_k: int | None,
                  seed: int) -> Iterator[int]:
        device = self.get_device()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            # inference_mode around the tensor work only: never held across a yield
            with torch.inference_mode():
                logits = self.forward(ids)[:, -1, :]
                next_id = sample_next_token(logits, generator, temperature, top_k).unsqueeze(1)
            ids = torch.cat((ids, next_id), dim=1)
            yield int(next_id.item())


def build_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """The one way to make a GPT: shapes on the meta device (no memory, no wasted init), storage
    on `device`, then `init_weights` (which also fills the non-persistent rotary tables)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
