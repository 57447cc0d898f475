"""Causal attention with sliding windows behind the FlashAttention-3 calling convention.

Two entry points with FA3's signatures, tensors laid out (B, T, H, D):

  flash_attn_func(q, k, v, causal=True, window_size=(left, right))
  flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                          window_size=(left, right), page_table=None)

With `page_table` (FA3's paged layout) the caches are a pool of pages (num_pages, page_size, H, D)
and row b's position p lives at page page_table[b, p // page_size], offset p % page_size.

Window semantics (FA3's): query at absolute position i sees key j iff i - left <= j <= i + right,
with -1 meaning "unbounded" on that side and causal forcing right = 0. Queries are aligned to the
bottom right of the keys, i.e. the last query sits at the last key position, which is what makes a
chunk of queries appended to a cache land at the cache position.

Backends: FA3 (`flash_attn_interface`) when importable, on a Hopper GPU, in a half dtype (FA3 has
no fp32 kernels). Otherwise PyTorch: SDPA for full-causal attention, FlexAttention with a cached block mask
for sliding windows on CUDA (a dense T x T mask would cost O(T^2) memory per call in training), and
SDPA with an explicit additive mask, built once per shape, on CPU/MPS and in the KV-cache path (a window
much shorter than the keys in blocks of queries, each against the keys it can see).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["HAS_FA3", "backend_name", "flash_attn_func", "flash_attn_with_kvcache"]


def _import_fa3() -> Any:
    try:
        import flash_attn_interface  # type: ignore[import-not-found]
    except (ImportError, OSError):  # OSError: installed but its CUDA libraries fail to load
        return None
    return flash_attn_interface


_FA3 = _import_fa3()
HAS_FA3: bool = _FA3 is not None
# FA3's kernels target SM 9.x only (not Ampere, not Blackwell). Decided once at import (as
# common.COMPUTE_DTYPE is) so the per-call check is a constant that torch.compile folds away.
_FA3_USABLE: bool = HAS_FA3 and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
_FA3_DTYPES = (torch.bfloat16, torch.float16)


def backend_name(device: torch.device | str, dtype: torch.dtype) -> str:
    """Which implementation attention on this device/dtype uses (for logs and benchmarks)."""
    device = torch.device(device)
    if _use_fa3(device, dtype):
        return "fa3"
    if device.type == "cuda":
        return "sdpa+flex"
    return "sdpa"


def _use_fa3(device: torch.device, dtype: torch.dtype) -> bool:
    return _FA3_USABLE and device.type == "cuda" and dtype in _FA3_DTYPES


# ---- argument checking ---------------------------------------------------------------------------


def _check_window(window_size: Any, causal: bool) -> tuple[int, int]:
    """Normalise FA3's (left, right) pair; causal attention never looks right of the query."""
    if (not isinstance(window_size, tuple | list) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, 0 if causal else right


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
    for name, t in (("q", q), (f"{what}k", k), (f"{what}v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, T, H, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{what}k and {what}v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(f"q {tuple(q.shape)} and {what}k {tuple(k.shape)} must agree on batch and head_dim")
    if q.size(2) % k.size(2) != 0:
        raise ValueError(f"query heads ({q.size(2)}) must be a multiple of key/value heads ({k.size(2)}) for GQA")


# ---- masks ---------------------------------------------------------------------------------------


def _visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Boolean mask [..., Tq, Tk]: key position j visible to query position i under the window.

    q_pos has shape [..., Tq], k_pos [Tk]; positions are absolute, so the same rule serves training
    (positions 0..T-1) and a chunk sitting at an arbitrary cache position.
    """
    delta = q_pos.unsqueeze(-1) - k_pos  # i - j
    visible = torch.ones_like(delta, dtype=torch.bool)
    if left >= 0:
        visible &= delta <= left
    if right >= 0:
        visible &= delta >= -right
    return visible


# ---- PyTorch backends ----------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          is_causal: bool = False) -> torch.Tensor:
    """SDPA on (B, T, H, D) inputs; GQA through enable_gqa so K/V are never materialised per head."""
    gqa = q.size(2) != k.size(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return out.transpose(1, 2)


BAND_QUERIES = 256  # queries per SDPA call of a sliding window much shorter than the keys (`_banded`)
_block_masks: dict[tuple[int, int, int, int, str], Any] = {}
_compiled_flex: Any = None


def _flex_block_mask(t_q: int, t_k: int, left: int, right: int, device: torch.device) -> Any:
    """Block mask for a sliding window, built once per (lengths, window, device) and reused every step."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (t_q, t_k, left, right, str(device))
    if key not in _block_masks:
        offset = t_k - t_q
        # an unbounded side becomes a bound no index pair can reach, so the rule stays one expression
        lowest = -right if right >= 0 else -t_k
        highest = left if left >= 0 else t_k

        def window_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            delta = q_idx + offset - kv_idx  # query position minus key position
            return (delta >= lowest) & (delta <= highest)

        _block_masks[key] = create_block_mask(window_mod, B=None, H=None, Q_LEN=t_q, KV_LEN=t_k, device=device)
    return _block_masks[key]


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """FlexAttention (compiled once: uncompiled flex materialises the full score matrix)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = _flex_block_mask(q.size(1), k.size(1), left, right, q.device)
    out = _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                         enable_gqa=q.size(2) != k.size(2))
    return out.transpose(1, 2)


def _torch_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int,
                use_flex: bool = True) -> torch.Tensor:
    """Queries at the last Tq of Tk key positions, on SDPA (FlexAttention for a real window on CUDA when
    `use_flex`: the KV-cache path turns it off, its shapes change every step and a block mask per shape
    would be built and kept for each)."""
    t_q, t_k = q.size(1), k.size(1)
    offset = t_k - t_q  # absolute position of query 0 (bottom-right alignment)
    # a side of the window is "free" when even the extreme query/key pair lies inside it
    left_free = left < 0 or left >= t_k - 1
    right_free = right < 0 or offset + right >= t_k - 1
    if left_free and right_free:
        return _sdpa(q, k, v)
    if left_free and right == 0 and t_q == t_k:  # SDPA's is_causal is top-left aligned: square only
        return _sdpa(q, k, v, is_causal=True)
    if use_flex and q.device.type == "cuda":
        return _flex(q, k, v, left, right)
    if right == 0 and 0 <= left and t_q >= 2 * BAND_QUERIES and left + 2 * BAND_QUERIES <= t_k:
        return _banded(q, k, v, left)
    return _sdpa(q, k, v, mask=_window_mask(t_q, t_k, left, right, q.device, q.dtype))


def _banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> torch.Tensor:
    """A causal sliding window as blocks of BAND_QUERIES queries, each against only the keys its window
    reaches. SDPA scores every query/key pair its mask covers, visible or not, so one masked call costs
    Tq x Tk where the window needs about Tq x (left + BAND_QUERIES): 3x less at nanochat's quarter-context
    window over 2048 positions."""
    t_q, t_k = q.size(1), k.size(1)
    offset = t_k - t_q
    blocks = []
    for first in range(0, t_q, BAND_QUERIES):
        end = min(t_q, first + BAND_QUERIES)
        keys = slice(max(0, offset + first - left), offset + end)  # the block's queries are its last keys
        blocks.append(_torch_attn(q[:, first:end], k[:, keys], v[:, keys], left, 0, use_flex=False))
    return torch.cat(blocks, dim=1)


def _window_mask(t_q: int, t_k: int, left: int, right: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (0 visible, -inf hidden) of queries at the last `t_q` of `t_k` key positions: the
    one SDPA would otherwise derive from a boolean mask in every call. Eagerly it is built once per shape
    and shared by every layer of a forward and by later forwards of that shape; a compiled graph builds it
    itself (Dynamo ignores a cache wrapper and warns about it)."""
    if torch.compiler.is_compiling():
        return _additive_mask(t_q, t_k, left, right, device, dtype)
    return _cached_window_mask(t_q, t_k, left, right, device, dtype)


@functools.lru_cache(maxsize=16)
def _cached_window_mask(t_q: int, t_k: int, left: int, right: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    # outside inference mode: a mask first built under torch.inference_mode can still be saved for a backward
    with torch.inference_mode(False):
        return _additive_mask(t_q, t_k, left, right, device, dtype)


def _additive_mask(t_q: int, t_k: int, left: int, right: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    positions = torch.arange(t_k, device=device)
    visible = _visibility(positions[t_k - t_q:], positions, left, right)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


# ---- public API ----------------------------------------------------------------------------------


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Attention over a whole sequence (training / a forward without cache). Returns (B, Tq, H, D)."""
    _check_qkv(q, k, v, "")
    if q.size(1) > k.size(1):
        raise ValueError(f"more queries ({q.size(1)}) than keys ({k.size(1)}): queries align to the last keys")
    left, right = _check_window(window_size, causal)
    if _use_fa3(q.device, q.dtype):
        out = _FA3.flash_attn_func(q, k, v, causal=causal, window_size=(left, right))
        return out[0] if isinstance(out, tuple) else out
    return _torch_attn(q, k, v, left, right)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | None = None, causal: bool = True,
                            window_size: tuple[int, int] = (-1, -1), *, page_table: torch.Tensor | None = None,
                            uniform_seqlen: int | None = None, host_seqlens: list[int] | None = None) -> torch.Tensor:
    """Attention of a chunk of queries against a KV cache, FA3-style.

    If k/v are given they are written into the caches in place at each row's `cache_seqlens`
    position (the caches are (B, S, H_kv, D), or pages with `page_table`); `cache_seqlens` itself is
    not advanced, that is the caller's job. Queries are the last Tq positions of each row's valid
    prefix (bottom-right aligned).

    Host-side hints (not in FA3's API) spare the PyTorch path reading `cache_seqlens` back from the
    device, which on CUDA would be a host sync in every layer of every decode step:
    `uniform_seqlen` promises that every row's length equals it; `host_seqlens` gives the lengths.
    """
    if page_table is not None:
        return _paged_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, page_table, causal,
                                        window_size, host_seqlens)
    _check_qkv(q, k_cache, v_cache, "cache ")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new keys/values to append) or neither")
    if k is not None:
        assert v is not None
        _check_qkv(q, k, v, "new ")
        if k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"new k {tuple(k.shape)} does not match the cache's heads/head_dim {tuple(k_cache.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when appending k/v to the cache")
    if cache_seqlens is not None:
        _check_seqlens(cache_seqlens, q.size(0))
    left, right = _check_window(window_size, causal)
    if _use_fa3(q.device, q.dtype) and k_cache.dtype == q.dtype:
        out = _FA3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                           causal=causal, window_size=(left, right))
        return out[0] if isinstance(out, tuple) else out
    return _torch_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, left, right, uniform_seqlen,
                                    host_seqlens)


def _check_seqlens(cache_seqlens: torch.Tensor, batch: int) -> None:
    if cache_seqlens.dim() != 1 or cache_seqlens.size(0) != batch:
        raise ValueError(f"cache_seqlens must have shape ({batch},), got {tuple(cache_seqlens.shape)}")


def _torch_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             k: torch.Tensor | None, v: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
                             left: int, right: int, uniform_seqlen: int | None,
                             host_seqlens: list[int] | None) -> torch.Tensor:
    batch, capacity = k_cache.size(0), k_cache.size(1)
    t_new = 0 if k is None else k.size(1)
    if cache_seqlens is None:
        lengths = [capacity] * batch
    elif uniform_seqlen is not None:
        lengths = [uniform_seqlen] * batch
    else:
        lengths = _host_lengths(cache_seqlens, host_seqlens)
    if min(lengths) < 0 or max(lengths) + t_new > capacity:
        raise ValueError(f"KV cache overflow: cache_seqlens {lengths} + {t_new} new positions exceeds "
                         f"the cache length {capacity}")
    if q.size(1) > min(lengths) + t_new:
        raise ValueError(f"{q.size(1)} queries but a row has only {min(lengths) + t_new} valid cache positions")
    if len(set(lengths)) == 1:
        return _uniform_cached_attn(q, k_cache, v_cache, k, v, lengths[0], left, right)
    return _ragged_cached_attn(q, k_cache, v_cache, k, v, lengths, left, right)


def _host_lengths(cache_seqlens: torch.Tensor, host_seqlens: list[int] | None) -> list[int]:
    if host_seqlens is None:
        # one host sync per call: the slicing needs the lengths as Python ints
        return [int(n) for n in cache_seqlens.tolist()]
    if len(host_seqlens) != cache_seqlens.size(0):
        raise ValueError(f"host_seqlens has {len(host_seqlens)} entries for {cache_seqlens.size(0)} rows")
    return list(host_seqlens)


def _uniform_cached_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                         v: torch.Tensor | None, pos: int, left: int, right: int) -> torch.Tensor:
    """All rows at the same position (our engine's case): plain slicing, no gather."""
    t_q = q.size(1)
    end = pos
    if k is not None and v is not None:
        end = pos + k.size(1)
        k_cache[:, pos:end] = k.to(k_cache.dtype)
        v_cache[:, pos:end] = v.to(v_cache.dtype)
    first_query = end - t_q
    # keys before the first query's window can never be seen: drop them (for a single decoded token
    # this keeps exactly the last window + 1 keys)
    start = max(0, first_query - left) if left >= 0 else 0
    # a prefill from position 0 is square, so a causal layer takes SDPA's is_causal kernel there
    return _torch_attn(q, k_cache[:, start:end].to(q.dtype), v_cache[:, start:end].to(q.dtype), left, right,
                       use_flex=False)


def _ragged_cached_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                        v: torch.Tensor | None, lengths: list[int], left: int, right: int) -> torch.Tensor:
    """Rows at different positions: scatter the new keys per row and mask each row separately."""
    device = q.device
    t_q = q.size(1)
    starts = torch.tensor(lengths, device=device)
    ends = starts
    if k is not None and v is not None:
        t_new = k.size(1)
        slots = starts.unsqueeze(1) + torch.arange(t_new, device=device)  # (B, t_new)
        rows = torch.arange(q.size(0), device=device).unsqueeze(1).expand_as(slots)
        k_cache[rows, slots] = k.to(k_cache.dtype)
        v_cache[rows, slots] = v.to(v_cache.dtype)
        ends = starts + t_new
    t_k = int(max(lengths)) + (0 if k is None else k.size(1))
    key_pos = torch.arange(t_k, device=device)
    query_pos = ends.unsqueeze(1) - t_q + torch.arange(t_q, device=device)  # (B, t_q)
    mask = _visibility(query_pos, key_pos, left, right) & (key_pos < ends.view(-1, 1, 1))
    keys = k_cache[:, :t_k].to(q.dtype)
    values = v_cache[:, :t_k].to(q.dtype)
    return _sdpa(q, keys, values, mask=mask.unsqueeze(1))


# ---- paged caches ---------------------------------------------------------------------------------


def _paged_attn_with_kvcache(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, k: torch.Tensor | None,
                             v: torch.Tensor | None, cache_seqlens: torch.Tensor | None, page_table: torch.Tensor,
                             causal: bool, window_size: tuple[int, int],
                             host_seqlens: list[int] | None) -> torch.Tensor:
    """flash_attn_with_kvcache over a page pool. New keys/values are written here on every backend,
    so FA3 only ever reads pages (its most exercised paged path)."""
    batch = q.size(0)
    if page_table.dim() != 2 or page_table.size(0) != batch or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 (B={batch}, pages_per_row), got {page_table.dtype} "
                         f"{tuple(page_table.shape)}")
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required with a page_table: pages carry no lengths")
    _check_seqlens(cache_seqlens, batch)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new keys/values to append) or neither")
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"paged k/v caches must both be (num_pages, page_size, H_kv, D), got "
                         f"{tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    if k is not None and v is not None:
        _check_qkv(q, k, v, "new ")
        if k.shape[2:] != k_pages.shape[2:]:
            raise ValueError(f"new k {tuple(k.shape)} does not match the pages' heads/head_dim {tuple(k_pages.shape)}")
    left, right = _check_window(window_size, causal)
    page_size = k_pages.size(1)
    lengths = _host_lengths(cache_seqlens, host_seqlens)
    t_new = 0 if k is None else k.size(1)
    ends = max(lengths) + t_new
    if min(lengths) < 0 or ends > page_table.size(1) * page_size:
        raise ValueError(f"paged KV cache overflow: cache_seqlens {lengths} + {t_new} new positions exceed the "
                         f"{page_table.size(1)} pages of {page_size} per row")
    if q.size(1) > min(lengths) + t_new:
        raise ValueError(f"{q.size(1)} queries but a row has only {min(lengths) + t_new} valid cache positions")
    starts = cache_seqlens.long()
    if k is not None and v is not None:
        new_pos = starts.unsqueeze(1) + torch.arange(t_new, device=q.device)  # (B, t_new)
        pages = page_table.gather(1, new_pos // page_size).long()
        k_pages[pages, new_pos % page_size] = k.to(k_pages.dtype)
        v_pages[pages, new_pos % page_size] = v.to(v_pages.dtype)
    if _use_fa3(q.device, q.dtype) and k_pages.dtype == q.dtype:
        out = _FA3.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=cache_seqlens + t_new,
                                           page_table=page_table, causal=causal, window_size=(left, right))
        return out[0] if isinstance(out, tuple) else out
    # keys before the earliest query's window are invisible to every row: gather only the rest
    t_q = q.size(1)
    first_key = max(0, min(lengths) + t_new - t_q - left) if left >= 0 else 0
    key_pos = torch.arange(first_key, ends, device=q.device)
    key_pages = page_table[:, key_pos // page_size].long()  # (B, T_k)
    keys = k_pages[key_pages, key_pos % page_size].to(q.dtype)  # (B, T_k, H_kv, D)
    values = v_pages[key_pages, key_pos % page_size].to(q.dtype)
    row_ends = starts + t_new
    query_pos = row_ends.unsqueeze(1) - t_q + torch.arange(t_q, device=q.device)  # (B, t_q)
    mask = _visibility(query_pos, key_pos, left, right) & (key_pos < row_ends.view(-1, 1, 1))
    return _sdpa(q, keys, values, mask=mask.unsqueeze(1))
