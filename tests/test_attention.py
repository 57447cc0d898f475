"""Spec for attention.py: the PyTorch fallback behind the FA3 API equals naive masked softmax.

The reference below loops over (row, query, head) and lists the visible keys explicitly from the
window rule "query at absolute position i sees key j iff i - left <= j <= i + right" (right = 0 when
causal, -1 = unbounded), in float64.
"""

from __future__ import annotations

import math
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs import attention
from nanochat_rs.attention import backend_name, flash_attn_func, flash_attn_with_kvcache

SETTINGS = settings(max_examples=40, deadline=None)


def visible_keys(query_pos: int, num_keys: int, left: int, right: int) -> list[int]:
    return [j for j in range(num_keys)
            if (left < 0 or query_pos - j <= left) and (right < 0 or j - query_pos <= right)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: list[list[int]],
                        num_keys: list[int], left: int, right: int) -> torch.Tensor:
    """q (B, Tq, H, D); k, v (B, Tk, H_kv, D); query_pos[b][i] absolute; row b has num_keys[b] valid keys."""
    q, k, v = q.double(), k.double(), v.double()
    batch, t_q, heads, dim = q.shape
    group = heads // k.size(2)
    out = torch.zeros_like(q)
    for b in range(batch):
        for i in range(t_q):
            keys = visible_keys(query_pos[b][i], num_keys[b], left, right)
            for h in range(heads):
                scores = k[b, keys, h // group] @ q[b, i, h] / math.sqrt(dim)
                out[b, i, h] = torch.softmax(scores, dim=0) @ v[b, keys, h // group]
    return out


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def heads(draw: st.DrawFn) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) with GQA groups of 1-3."""
    kv = draw(st.integers(1, 2))
    return kv * draw(st.integers(1, 3)), kv, draw(st.sampled_from([4, 8]))


# ---- whole-sequence attention (training) ------------------------------------------------------------


@SETTINGS
@given(batch=st.integers(1, 2), t=st.integers(1, 20), hd=heads(), left=st.integers(-1, 22), seed=st.integers(0, 99))
def test_causal_sliding_window_matches_reference(batch: int, t: int, hd: tuple[int, int, int], left: int,
                                                 seed: int) -> None:
    h, h_kv, d = hd
    q, k, v = randn(batch, t, h, d, seed=seed), randn(batch, t, h_kv, d, seed=seed + 1), randn(batch, t, h_kv, d,
                                                                                                seed=seed + 2)
    out = flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    expected = reference_attention(q, k, v, [list(range(t))] * batch, [t] * batch, left, 0)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(t_q=st.integers(1, 8), extra=st.integers(0, 8), left=st.integers(-1, 10), right=st.integers(-1, 4),
       causal=st.booleans(), seed=st.integers(0, 99))
def test_bottom_right_alignment_and_two_sided_windows(t_q: int, extra: int, left: int, right: int, causal: bool,
                                                      seed: int) -> None:
    """Fewer queries than keys: the queries are the last positions (FA3 convention)."""
    t_k = t_q + extra
    q, k, v = randn(1, t_q, 2, 4, seed=seed), randn(1, t_k, 1, 4, seed=seed + 1), randn(1, t_k, 1, 4, seed=seed + 2)
    out = flash_attn_func(q, k, v, causal=causal, window_size=(left, right))
    effective_right = 0 if causal else right
    expected = reference_attention(q, k, v, [list(range(extra, t_k))], [t_k], left, effective_right)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_larger_than_sequence_is_plain_causal() -> None:
    q, k, v = randn(2, 9, 4, 8, seed=0), randn(2, 9, 2, 8, seed=1), randn(2, 9, 2, 8, seed=2)
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(100, 0)),
                               flash_attn_func(q, k, v, window_size=(-1, 0)))


def test_gradients_flow_through_the_windowed_fallback() -> None:
    q, k, v = (randn(1, 12, 2, 4, seed=s).requires_grad_() for s in range(3))
    flash_attn_func(q, k, v, window_size=(3, 0)).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@SETTINGS
@given(t_q=st.integers(1, 30), extra=st.integers(0, 12), left=st.integers(0, 8), band=st.integers(1, 4),
       seed=st.integers(0, 99))
def test_a_short_window_runs_in_bands_of_queries_with_the_same_result(t_q: int, extra: int, left: int, band: int,
                                                                      seed: int) -> None:
    """Long sequences under a short window take `_banded` (blocks of BAND_QUERIES queries, each against the
    keys its window reaches): shrunk here so small shapes take it too."""
    t_k = t_q + extra
    q, k, v = randn(2, t_q, 2, 4, seed=seed), randn(2, t_k, 1, 4, seed=seed + 1), randn(2, t_k, 1, 4, seed=seed + 2)
    with mock.patch.object(attention, "BAND_QUERIES", band), mock.patch.object(attention, "_banded",
                                                                              wraps=attention._banded) as banded:
        out = flash_attn_func(q, k, v, window_size=(left, 0))
    assert banded.called == (t_q >= 2 * band and left + 2 * band <= t_k)
    expected = reference_attention(q, k, v, [list(range(extra, t_k))] * 2, [t_k] * 2, left, 0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_bands() -> None:
    q, k, v = (randn(1, 24, 2, 4, seed=s).requires_grad_() for s in range(3))
    with mock.patch.object(attention, "BAND_QUERIES", 4):
        flash_attn_func(q, k, v, window_size=(3, 0)).square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    flash_attn_func(q, k, v, window_size=(3, 0)).square().sum().backward()
    for banded, whole in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(banded, whole)


def test_a_compiled_window_builds_its_mask_in_the_graph_without_warnings() -> None:
    """Dynamo ignores a cache wrapper and warns on every compile that it did: the compiled path must not
    reach the eager mask cache."""
    q, k, v = randn(1, 12, 2, 4, seed=0), randn(1, 12, 1, 4, seed=1), randn(1, 12, 1, 4, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(flash_attn_func, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compiled(q, k, v, window_size=(3, 0))
    torch.testing.assert_close(out, flash_attn_func(q, k, v, window_size=(3, 0)))


# ---- attention against a KV cache -------------------------------------------------------------------


@SETTINGS
@given(batch=st.integers(1, 2), pos=st.integers(0, 24), t=st.integers(1, 8), spare=st.integers(0, 3),
       hd=heads(), left=st.integers(-1, 12), seed=st.integers(0, 99), hint=st.booleans())
def test_chunk_at_any_cache_position_matches_reference(batch: int, pos: int, t: int, spare: int,
                                                       hd: tuple[int, int, int], left: int, seed: int,
                                                       hint: bool) -> None:
    h, h_kv, d = hd
    capacity = pos + t + spare
    # garbage everywhere, including past the valid prefix: it must be neither read nor kept
    k_cache, v_cache = randn(batch, capacity, h_kv, d, seed=seed), randn(batch, capacity, h_kv, d, seed=seed + 1)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = randn(batch, t, h, d, seed=seed + 2)
    k_new, v_new = randn(batch, t, h_kv, d, seed=seed + 3), randn(batch, t, h_kv, d, seed=seed + 4)
    seqlens = torch.full((batch,), pos, dtype=torch.int32)

    # with the host-side hint the lengths are not read back from cache_seqlens; the result is the same
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                  causal=True, window_size=(left, 0), uniform_seqlen=pos if hint else None)

    full_k = torch.cat((before_k[:, :pos], k_new), dim=1)
    full_v = torch.cat((before_v[:, :pos], v_new), dim=1)
    expected = reference_attention(q, full_k, full_v, [list(range(pos, pos + t))] * batch, [pos + t] * batch,
                                   left, 0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # written in place at [pos, pos + t), everything else untouched, lengths left to the caller
    torch.testing.assert_close(k_cache[:, pos:pos + t], k_new)
    torch.testing.assert_close(v_cache[:, pos:pos + t], v_new)
    for cache, before in ((k_cache, before_k), (v_cache, before_v)):
        assert torch.equal(cache[:, :pos], before[:, :pos])
        assert torch.equal(cache[:, pos + t:], before[:, pos + t:])
    assert seqlens.tolist() == [pos] * batch


@SETTINGS
@given(lengths=st.lists(st.integers(0, 16), min_size=2, max_size=3), t=st.integers(1, 4),
       left=st.integers(-1, 8), seed=st.integers(0, 99))
def test_rows_at_different_positions(lengths: list[int], t: int, left: int, seed: int) -> None:
    batch, capacity = len(lengths), max(lengths) + t
    k_cache, v_cache = randn(batch, capacity, 1, 4, seed=seed), randn(batch, capacity, 1, 4, seed=seed + 1)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = randn(batch, t, 2, 4, seed=seed + 2), randn(batch, t, 1, 4, seed=seed + 3), randn(
        batch, t, 1, 4, seed=seed + 4)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                  cache_seqlens=torch.tensor(lengths, dtype=torch.int32), window_size=(left, 0))
    for b, n in enumerate(lengths):
        row_k = torch.cat((before_k[b:b + 1, :n], k_new[b:b + 1]), dim=1)
        row_v = torch.cat((before_v[b:b + 1, :n], v_new[b:b + 1]), dim=1)
        expected = reference_attention(q[b:b + 1], row_k, row_v, [list(range(n, n + t))], [n + t], left, 0)
        torch.testing.assert_close(out[b:b + 1].double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_cache[b, n:n + t], k_new[b])


@pytest.mark.parametrize("pos", [5, 6, 7, 30])
def test_single_token_decode_reads_only_the_last_window_plus_one_keys(pos: int) -> None:
    """Keys older than the window are not merely masked but never read: NaN there cannot leak in."""
    window = 5
    k_cache, v_cache = randn(1, 40, 1, 8, seed=0), randn(1, 40, 1, 8, seed=1)
    oldest_visible = max(0, pos - window)
    k_cache[:, :oldest_visible] = float("nan")
    v_cache[:, :oldest_visible] = float("nan")
    q, k_new, v_new = randn(1, 1, 2, 8, seed=2), randn(1, 1, 1, 8, seed=3), randn(1, 1, 1, 8, seed=4)
    snapshot_k = torch.cat((k_cache[:, :pos], k_new), dim=1)
    snapshot_v = torch.cat((v_cache[:, :pos], v_new), dim=1)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                  cache_seqlens=torch.tensor([pos], dtype=torch.int32), window_size=(window, 0))
    assert torch.isfinite(out).all()
    expected = reference_attention(q, snapshot_k, snapshot_v, [[pos]], [pos + 1], window, 0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_query_only_attends_the_existing_cache() -> None:
    """k=None: nothing is written, queries are the last positions of the valid prefix."""
    k_cache, v_cache = randn(1, 10, 1, 4, seed=0), randn(1, 10, 1, 4, seed=1)
    before = k_cache.clone()
    q = randn(1, 2, 1, 4, seed=2)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([7], dtype=torch.int32),
                                  window_size=(3, 0))
    expected = reference_attention(q, k_cache, v_cache, [[5, 6]], [7], 3, 0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, before)


def test_chunked_prefill_equals_one_shot_attention() -> None:
    """Feeding a sequence in chunks through the cache gives the same outputs as the full sequence."""
    t, window = 23, 6
    q, k, v = randn(2, t, 4, 8, seed=0), randn(2, t, 2, 8, seed=1), randn(2, t, 2, 8, seed=2)
    full = flash_attn_func(q, k, v, window_size=(window, 0))
    k_cache, v_cache = torch.zeros(2, t, 2, 8), torch.zeros(2, t, 2, 8)
    seqlens = torch.zeros(2, dtype=torch.int32)
    pieces = []
    for start, end in ((0, 9), (9, 10), (10, 17), (17, 18), (18, 23)):
        pieces.append(flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k=k[:, start:end],
                                              v=v[:, start:end], cache_seqlens=seqlens, window_size=(window, 0)))
        seqlens += end - start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-6, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors() -> None:
    q, k, v = randn(1, 4, 3, 8, seed=0), randn(1, 4, 2, 8, seed=1), randn(1, 4, 2, 8, seed=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attn_func(q, k, v)
    q = randn(1, 4, 2, 8, seed=0)
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= -1"):
        flash_attn_func(q, k, v, window_size=(-3, 0))
    with pytest.raises(ValueError, match="more queries"):
        flash_attn_func(randn(1, 5, 2, 8, seed=0), k, v)
    cache = torch.zeros(1, 6, 2, 8)
    lengths = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="both k and v"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=k, cache_seqlens=lengths)
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=k, v=v)
    with pytest.raises(ValueError, match="overflow"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=k, v=v, cache_seqlens=lengths)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=k, v=v, cache_seqlens=torch.zeros(2, dtype=torch.int32))


def test_cpu_backend_is_sdpa() -> None:
    assert backend_name("cpu", torch.float32) == "sdpa"


# ---- CUDA: FlexAttention (or FA3) for sliding windows ------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(t_q=st.integers(1, 24), extra=st.integers(0, 8), left=st.integers(-1, 12), right=st.integers(-1, 4),
       hd=heads(), seed=st.integers(0, 99))
def test_flex_path_block_mask_matches_reference(t_q: int, extra: int, left: int, right: int,
                                                hd: tuple[int, int, int], seed: int) -> None:
    """The CUDA sliding-window route (block mask + layout + GQA), run here with eager FlexAttention
    instead of the compiled kernel: the same mask_mod and arguments, checked on CPU."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    h, h_kv, d = hd
    t_k = t_q + extra
    q, k, v = randn(1, t_q, h, d, seed=seed), randn(1, t_k, h_kv, d, seed=seed + 1), randn(1, t_k, h_kv, d,
                                                                                           seed=seed + 2)
    with mock.patch.object(attention, "_compiled_flex", flex_attention), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile": intended here
        out = attention._flex(q, k, v, left, right)
    expected = reference_attention(q, k, v, [list(range(extra, t_k))], [t_k], left, right)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sliding_window_matches_reference(dtype: torch.dtype) -> None:
    t, window = 300, 128
    q, k, v = (randn(2, t, 4, 64, seed=s).cuda().to(dtype) for s in range(3))
    kv = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    out = flash_attn_func(q, kv[0], kv[1], window_size=(window, 0))
    expected = reference_attention(q[:1].cpu(), kv[0][:1].cpu(), kv[1][:1].cpu(), [list(range(t))], [t], window, 0)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[:1].double().cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_matches_reference() -> None:
    k_cache, v_cache = randn(1, 64, 2, 64, seed=0).cuda(), randn(1, 64, 2, 64, seed=1).cuda()
    snapshot_k, snapshot_v = k_cache.clone().cpu(), v_cache.clone().cpu()
    q, k_new, v_new = randn(1, 1, 4, 64, seed=2).cuda(), randn(1, 1, 2, 64, seed=3).cuda(), randn(
        1, 1, 2, 64, seed=4).cuda()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new,
                                  cache_seqlens=torch.tensor([40], dtype=torch.int32, device="cuda"),
                                  window_size=(16, 0))
    snapshot_k[:, 40:41], snapshot_v[:, 40:41] = k_new.cpu(), v_new.cpu()
    expected = reference_attention(q.cpu(), snapshot_k, snapshot_v, [[40]], [41], 16, 0)
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-3, rtol=1e-3)
