"""Key/value cache for incremental inference with GPT.forward(idx, kv_cache=cache).

Protocol: every attention layer writes its new keys/values at position `get_pos()` (through
`attention.flash_attn_with_kvcache`, which writes in place), the model stores the smear state, and
after the last layer GPT.forward calls `advance(T)` exactly once. All rows advance together in our
engine, so one Python-side position mirrors `cache_seqlens` and no device sync is needed to read it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanochat_rs.common import compute_dtype

__all__ = ["KVCache", "ModelShape"]


class ModelShape(Protocol):
    """What a cache needs to know about a model (a `GPTConfig` has it). A protocol rather than the
    config class itself: gpt imports this module, so this module must not import gpt."""

    @property
    def n_layer(self) -> int: ...

    @property
    def n_kv_head(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def n_embd(self) -> int: ...


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KVCache:
    """Per-layer K/V tensors (num_layers, B, max_seq_len, H_kv, D) plus per-row lengths and smear state.

    `max_seq_len` is the capacity in positions; `get_pos()` of them are used. `dtype` defaults to
    the compute dtype (`common.compute_dtype()`).
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str, dtype: torch.dtype | None = None, n_embd: int | None = None) -> None:
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.n_embd = None if n_embd is None else _positive_int("n_embd", n_embd)
        self.device = torch.device(device)
        self.dtype = compute_dtype() if dtype is None else dtype
        shape = (num_layers, batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.cache_seqlens = torch.zeros(batch_size, device=self.device, dtype=torch.int32)
        # normed (pre-smear) embedding of the last token fed; None while nothing has been fed, which
        # is what tells the model that the next token is position 0 and gets no smear
        self.prev_embedding: torch.Tensor | None = None
        self._pos = 0

    @classmethod
    def for_model(cls, config: ModelShape, batch_size: int, max_seq_len: int, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for a model with this config (e.g. a `GPTConfig`)."""
        return cls(batch_size=batch_size, num_kv_heads=config.n_kv_head, max_seq_len=max_seq_len,
                   head_dim=config.head_dim, num_layers=config.n_layer, device=device, dtype=dtype,
                   n_embd=config.n_embd)

    def get_pos(self) -> int:
        return self._pos

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def remaining(self) -> int:
        """Positions still free."""
        return self.max_seq_len - self._pos

    def advance(self, num_tokens: int) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        if num_tokens > self.remaining():
            raise ValueError(f"cannot advance by {num_tokens}: the cache holds {self.max_seq_len} positions and "
                             f"{self._pos} are used")
        self._pos += num_tokens
        self.cache_seqlens += num_tokens

    def reset(self) -> None:
        # stale keys/values beyond the valid length are never attended, so they need no clearing
        self._pos = 0
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def set_prev_embedding(self, embedding: torch.Tensor) -> None:
        """Remember the last fed token's normed embedding (B, 1, n_embd) for the next chunk's smear."""
        expected = (self.batch_size, 1, self.n_embd if self.n_embd is not None else embedding.size(-1))
        if embedding.dim() != 3 or tuple(embedding.shape) != expected:
            raise ValueError(f"smear state must have shape {expected}, got {tuple(embedding.shape)}")
        self.prev_embedding = embedding.detach().clone()

    def prefill(self, other: KVCache) -> None:
        """Copy a batch-1 cache into every row of this one (one prompt prefill shared by N samples)."""
        if not isinstance(other, KVCache):
            raise TypeError(f"prefill expects a KVCache, got {type(other).__name__}")
        if other.batch_size != 1:
            raise ValueError(f"prefill copies from a batch-1 cache, got batch_size={other.batch_size}")
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (other.num_layers, other.num_kv_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cache geometry (layers, kv heads, head_dim) differs: {theirs} into {mine}")
        pos = other.get_pos()
        if pos > self.max_seq_len:
            raise ValueError(f"the source cache holds {pos} positions, more than this cache's {self.max_seq_len}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos].to(self.device, self.dtype)
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos].to(self.device, self.dtype)
        self._pos = pos
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is None:
            self.prev_embedding = None
        else:
            self.set_prev_embedding(other.prev_embedding.to(self.device).expand(self.batch_size, -1, -1))
