"""Key/value caches for incremental inference with GPT.forward(idx, kv_cache=cache).

Two layouts, one protocol: every attention layer writes its new keys/values at each row's current
length (through `attention.flash_attn_with_kvcache`, which writes in place), the model stores the smear
state, and after the last layer GPT.forward calls `advance(T)` exactly once.

* `KVCache`: one (B, max_seq_len) block, all rows at one position. The Engine's rows advance in
  lockstep, so one Python-side position mirrors `cache_seqlens` and no device sync is needed to read it.
* `PagedKVCache`: a pool of fixed-size pages shared by many independent sequences (slots), each with
  its own length, for continuous batching. A forward runs over any subset of slots through
  `PagedKVCache.rows(slots)`; rows sit at different positions, so rotary positions, attention masks
  and smear state are per row.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanochat_rs.common import compute_dtype

__all__ = ["KVCache", "ModelShape", "PagedKVCache", "PagedRows"]


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


def _check_advance(num_tokens: object, remaining: int, used: str) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if num_tokens > remaining:
        raise ValueError(f"cannot advance by {num_tokens}: {used}")
    return num_tokens


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
        _check_advance(num_tokens, self.remaining(),
                       f"the cache holds {self.max_seq_len} positions and {self._pos} are used")
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

    def prefill(self, other: KVCache, rows: torch.Tensor | None = None) -> None:
        """Continue another cache: row r of this one gets `other`'s row `rows[r]`. Without `rows`,
        `other` must have one row, copied into every row (one prompt prefill shared by N samples)."""
        if not isinstance(other, KVCache):
            raise TypeError(f"prefill expects a KVCache, got {type(other).__name__}")
        if rows is None:
            if other.batch_size != 1:
                raise ValueError(f"prefill copies from a batch-1 cache, got batch_size={other.batch_size}")
            rows = torch.zeros(self.batch_size, dtype=torch.long)
        elif rows.dim() != 1 or rows.numel() != self.batch_size:
            raise ValueError(f"rows must name one source row per row of this cache ({self.batch_size}), got "
                             f"shape {tuple(rows.shape)}")
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (other.num_layers, other.num_kv_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cache geometry (layers, kv heads, head_dim) differs: {theirs} into {mine}")
        pos = other.get_pos()
        if pos > self.max_seq_len:
            raise ValueError(f"the source cache holds {pos} positions, more than this cache's {self.max_seq_len}")
        rows = rows.to(other.k_cache.device)
        self.k_cache[:, :, :pos] = other.k_cache[:, rows, :pos].to(self.device, self.dtype)
        self.v_cache[:, :, :pos] = other.v_cache[:, rows, :pos].to(self.device, self.dtype)
        self._pos = pos
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is None:
            self.prev_embedding = None
        else:
            self.set_prev_embedding(other.prev_embedding[rows].to(self.device))


class PagedKVCache:
    """Keys/values of independent sequences in one pool of pages: (num_layers, num_pages, page_size, H_kv, D).

    A sequence lives in a slot, which owns a list of pages (its row of `page_table`, int32
    (num_slots, pages_per_slot) in FA3's paged layout) and its own length. `allocate` claims a slot and
    the pages for the sequence's whole reservation up front, so a running sequence can never run out
    of memory halfway; `release` hands both back for reuse. The pool's size, num_pages * page_size
    positions, is the memory budget that all sequences share.

    `prev_embeddings` (num_slots, 1, n_embd) is each slot's smear state: zero while the slot holds
    nothing, which leaves a sequence's first token unsmeared exactly as position 0 must be.
    """

    def __init__(self, num_slots: int, num_pages: int, page_size: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, num_layers: int, n_embd: int, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> None:
        self.num_slots = _positive_int("num_slots", num_slots)
        self.num_pages = _positive_int("num_pages", num_pages)
        self.page_size = _positive_int("page_size", page_size)
        self.max_seq_len = _positive_int("max_seq_len", max_seq_len)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.n_embd = _positive_int("n_embd", n_embd)
        self.device = torch.device(device)
        self.dtype = compute_dtype() if dtype is None else dtype
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_pages = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.pages_per_slot = self.pages_for(max_seq_len)
        self.page_table = torch.zeros((num_slots, self.pages_per_slot), device=self.device, dtype=torch.int32)
        self.prev_embeddings = torch.zeros((num_slots, 1, n_embd), device=self.device, dtype=self.dtype)
        self._lengths = [0] * num_slots
        self._capacities = [0] * num_slots  # reserved positions; 0 = the slot is free
        self._slot_pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._free_slots = list(range(num_slots))
        self._free_pages = list(range(num_pages))

    @classmethod
    def for_model(cls, config: ModelShape, num_slots: int, num_pages: int, page_size: int, max_seq_len: int,
                  device: torch.device | str, dtype: torch.dtype | None = None) -> PagedKVCache:
        """A pool shaped for a model with this config (e.g. a `GPTConfig`)."""
        return cls(num_slots=num_slots, num_pages=num_pages, page_size=page_size, max_seq_len=max_seq_len,
                   num_kv_heads=config.n_kv_head, head_dim=config.head_dim, num_layers=config.n_layer,
                   n_embd=config.n_embd, device=device, dtype=dtype)

    # ---- allocation ---------------------------------------------------------------------------------

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def free_slot_count(self) -> int:
        return len(self._free_slots)

    def free_page_count(self) -> int:
        return len(self._free_pages)

    def can_allocate(self, positions: int) -> bool:
        return bool(self._free_slots) and self.pages_for(positions) <= len(self._free_pages)

    def allocate(self, positions: int) -> int:
        """Claim a free slot with room for `positions` positions; returns the slot, at length 0."""
        positions = _positive_int("positions", positions)
        if positions > self.max_seq_len:
            raise ValueError(f"a slot holds at most {self.max_seq_len} positions, {positions} requested")
        if not self.can_allocate(positions):
            raise ValueError(f"no room for {positions} positions: {len(self._free_slots)} free slots, "
                             f"{len(self._free_pages)} free pages of {self.page_size}")
        slot = self._free_slots.pop(0)
        pages = [self._free_pages.pop() for _ in range(self.pages_for(positions))]
        self._slot_pages[slot] = pages
        self._capacities[slot] = positions
        self._lengths[slot] = 0
        self.page_table[slot, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return slot

    def release(self, slot: int) -> None:
        """Free a slot and its pages; its stale keys are never read again (lengths mask them)."""
        self._check_allocated(slot)
        self._free_pages.extend(reversed(self._slot_pages[slot]))
        self._slot_pages[slot] = []
        self._capacities[slot] = 0
        self._lengths[slot] = 0
        self.prev_embeddings[slot].zero_()
        self._free_slots.append(slot)
        self._free_slots.sort()  # lowest slot first: deterministic reuse

    def length(self, slot: int) -> int:
        self._check_allocated(slot)
        return self._lengths[slot]

    def capacity(self, slot: int) -> int:
        self._check_allocated(slot)
        return self._capacities[slot]

    def _check_allocated(self, slot: object) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")
        if self._capacities[slot] == 0:
            raise ValueError(f"slot {slot} is not allocated")

    # ---- the model's view -------------------------------------------------------------------------

    def rows(self, slots: list[int]) -> PagedRows:
        """The kv_cache argument for one GPT.forward whose input row i continues slot `slots[i]`."""
        return PagedRows(self, slots)

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        return self.k_pages[layer_idx], self.v_pages[layer_idx]

    def _advance_slots(self, slots: list[int], num_tokens: int) -> None:
        for slot in slots:
            self._lengths[slot] += num_tokens


class PagedRows:
    """Some slots of a PagedKVCache as the batch of one forward: per-row lengths (`cache_seqlens` on
    the device, `lengths` on the host, so attention needs no device sync to size its work), page
    table rows and smear state. Built by `PagedKVCache.rows`; it stays in step with the pool through
    `advance`."""

    def __init__(self, cache: PagedKVCache, slots: list[int]) -> None:
        if not slots:
            raise ValueError("rows needs at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError(f"each slot may appear once per forward, got {slots}")
        for slot in slots:
            cache._check_allocated(slot)
        self.cache = cache
        self.slots = list(slots)
        self.lengths = [cache.length(slot) for slot in slots]
        self.batch_size = len(slots)
        self.num_layers, self.num_kv_heads, self.head_dim = cache.num_layers, cache.num_kv_heads, cache.head_dim
        self._index = torch.tensor(slots, dtype=torch.long, device=cache.device)
        self.cache_seqlens = torch.tensor(self.lengths, dtype=torch.int32, device=cache.device)
        self.page_table = cache.page_table[self._index]

    def get_layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.get_layer_cache(layer_idx)

    def remaining(self) -> int:
        """Positions every row still has room for."""
        return min(self.cache.capacity(slot) - length for slot, length in zip(self.slots, self.lengths, strict=True))

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Absolute positions (B, num_tokens) of the next `num_tokens` tokens of each row."""
        steps = torch.arange(num_tokens, device=self.cache.device)
        return self.cache_seqlens.long().unsqueeze(1) + steps

    @property
    def prev_embedding(self) -> torch.Tensor:
        """Smear state (B, 1, n_embd): each row's last fed token, zero for a row at position 0."""
        return self.cache.prev_embeddings[self._index]

    def set_prev_embedding(self, embedding: torch.Tensor) -> None:
        expected = (self.batch_size, 1, self.cache.n_embd)
        if embedding.dim() != 3 or tuple(embedding.shape) != expected:
            raise ValueError(f"smear state must have shape {expected}, got {tuple(embedding.shape)}")
        self.cache.prev_embeddings[self._index] = embedding.detach().to(self.cache.dtype)

    def advance(self, num_tokens: int) -> None:
        _check_advance(num_tokens, self.remaining(), f"a row has only {self.remaining()} reserved positions left")
        self.cache._advance_slots(self.slots, num_tokens)
        self.lengths = [length + num_tokens for length in self.lengths]
        self.cache_seqlens += num_tokens
