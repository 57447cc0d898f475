"""Spec for kv_cache.KVCache and GPT.forward(kv_cache=...): incremental inference reproduces the
full forward exactly (prefill chunks, token-by-token decode, sliding windows, smear state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import random_gpt
from nanochat_rs import kv_cache
from nanochat_rs.gpt import GPT, GPTConfig, build_model
from nanochat_rs.kv_cache import KVCache, PagedKVCache

# seq 256 -> short window 128, so sequences of ~200 tokens cross it
CONFIG = dict(sequence_len=256, vocab_size=100, n_layer=4, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSSL")


def random_model(seed: int = 0, **overrides: object) -> GPT:
    return random_gpt(GPTConfig(**{**CONFIG, **overrides}), seed)  # type: ignore[arg-type]


def new_cache(model: GPT, batch: int, max_seq_len: int) -> KVCache:
    c = model.config
    return KVCache(batch_size=batch, num_kv_heads=c.n_kv_head, max_seq_len=max_seq_len, head_dim=c.head_dim,
                   num_layers=c.n_layer, device="cpu", dtype=torch.float32, n_embd=c.n_embd)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the cache object ---------------------------------------------------------------------------


def test_layout_and_bookkeeping() -> None:
    cache = KVCache(batch_size=3, num_kv_heads=2, max_seq_len=10, head_dim=4, num_layers=5, device="cpu",
                    dtype=torch.float32, n_embd=8)
    assert cache.k_cache.shape == cache.v_cache.shape == (5, 3, 10, 2, 4)
    assert cache.max_seq_len == 10 and cache.remaining() == 10
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.tolist() == [0, 0, 0]
    assert cache.get_pos() == 0 and cache.prev_embedding is None
    k, v = cache.get_layer_cache(2)
    assert k.shape == (3, 10, 2, 4)
    k[0, 0, 0, 0] = 7.0  # a view, not a copy: attention writes through it
    assert cache.k_cache[2, 0, 0, 0, 0] == 7.0
    cache.advance(4)
    cache.advance(3)
    assert cache.get_pos() == 7 and cache.cache_seqlens.tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="cannot advance"):
        cache.advance(4)
    cache.set_prev_embedding(torch.ones(3, 1, 8))
    cache.reset()
    assert cache.get_pos() == 0 and cache.cache_seqlens.tolist() == [0, 0, 0] and cache.prev_embedding is None
    with pytest.raises(IndexError):
        cache.get_layer_cache(5)


def test_the_cache_module_does_not_need_the_model() -> None:
    """kv_cache sits below gpt (gpt imports it), so it must not import gpt, not even for type hints."""
    source = Path(kv_cache.__file__).read_text()
    assert "nanochat_rs.gpt" not in source and "from .gpt" not in source
    model = random_model()
    cache = KVCache.for_model(model.config, 2, 30, "cpu")  # any object with the model's shape fields
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.n_embd, cache.max_seq_len) == (
        4, 1, 32, 64, 30)


def test_constructor_and_smear_state_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(batch_size=0, num_kv_heads=1, max_seq_len=4, head_dim=4, num_layers=1, device="cpu")
    cache = KVCache(batch_size=2, num_kv_heads=1, max_seq_len=4, head_dim=4, num_layers=1, device="cpu", n_embd=8)
    with pytest.raises(ValueError, match="smear state"):
        cache.set_prev_embedding(torch.ones(2, 1, 9))


def test_prefill_replicates_a_batch_one_cache() -> None:
    single = KVCache(batch_size=1, num_kv_heads=2, max_seq_len=6, head_dim=4, num_layers=3, device="cpu",
                     dtype=torch.float32, n_embd=8)
    single.k_cache.normal_()
    single.v_cache.normal_()
    single.advance(5)
    single.set_prev_embedding(torch.randn(1, 1, 8))
    many = KVCache(batch_size=4, num_kv_heads=2, max_seq_len=9, head_dim=4, num_layers=3, device="cpu",
                   dtype=torch.float32, n_embd=8)
    many.prefill(single)
    assert many.get_pos() == 5 and many.cache_seqlens.tolist() == [5] * 4
    for row in range(4):
        assert torch.equal(many.k_cache[:, row, :5], single.k_cache[:, 0, :5])
        assert torch.equal(many.v_cache[:, row, :5], single.v_cache[:, 0, :5])
    assert many.prev_embedding is not None and single.prev_embedding is not None
    assert torch.equal(many.prev_embedding, single.prev_embedding.expand(4, 1, 8))
    with pytest.raises(ValueError, match="batch-1"):
        single.prefill(many)
    other_shape = KVCache(batch_size=1, num_kv_heads=1, max_seq_len=6, head_dim=4, num_layers=3, device="cpu")
    with pytest.raises(ValueError, match="geometry"):
        many.prefill(other_shape)

    small = KVCache(batch_size=2, num_kv_heads=2, max_seq_len=4, head_dim=4, num_layers=3, device="cpu")
    with pytest.raises(ValueError, match="more than"):
        small.prefill(single)


# ---- GPT with a cache == GPT without ----------------------------------------------------------------


def test_prefill_from_chosen_rows() -> None:
    """Row r continues the source's row rows[r] (one shared prefix per item, forked to its choices)."""
    source = KVCache(batch_size=2, num_kv_heads=1, max_seq_len=6, head_dim=4, num_layers=2, device="cpu",
                     dtype=torch.float32, n_embd=8)
    source.k_cache.normal_()
    source.v_cache.normal_()
    source.advance(3)
    source.set_prev_embedding(torch.randn(2, 1, 8))
    forked = KVCache(batch_size=3, num_kv_heads=1, max_seq_len=8, head_dim=4, num_layers=2, device="cpu",
                     dtype=torch.float32, n_embd=8)
    forked.prefill(source, rows=torch.tensor([1, 0, 1]))
    assert forked.get_pos() == 3 and forked.prev_embedding is not None and source.prev_embedding is not None
    for row, origin in enumerate([1, 0, 1]):
        assert torch.equal(forked.k_cache[:, row, :3], source.k_cache[:, origin, :3])
        assert torch.equal(forked.v_cache[:, row, :3], source.v_cache[:, origin, :3])
        assert torch.equal(forked.prev_embedding[row], source.prev_embedding[origin])
    with pytest.raises(ValueError, match="one source row per row"):
        forked.prefill(source, rows=torch.tensor([0, 1]))



def incremental_logits(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed idx in the given chunk sizes (then one token at a time) through one cache."""
    cache = new_cache(model, idx.size(0), idx.size(1) + 3)
    outputs, pos = [], 0
    with torch.no_grad():
        for size in chunks:
            outputs.append(model(idx[:, pos:pos + size], kv_cache=cache))
            pos += size
        while pos < idx.size(1):
            outputs.append(model(idx[:, pos:pos + 1], kv_cache=cache))
            pos += 1
    assert cache.get_pos() == idx.size(1)
    return torch.cat(outputs, dim=1)


def test_prefill_then_decode_past_the_sliding_window_equals_full_forward() -> None:
    model = random_model()
    assert min(model.window_sizes) == 128
    idx = tokens(2, 200)
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(incremental_logits(model, idx, [60, 1, 45]), full, atol=2e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4), seed=st.integers(0, 50))
def test_any_chunking_equals_full_forward(chunks: list[int], seed: int) -> None:
    model = random_model(seed, n_layer=2, window_pattern="SL", sequence_len=128)
    # configs only produce windows that are multiples of 128; shrink layer 0's so that 60-token
    # sequences cross it many times, at every chunk boundary the strategy picks
    model.window_sizes = [7, 128]
    idx = tokens(1, 60, seed)
    while sum(chunks) > 60:
        chunks.pop()
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(incremental_logits(model, idx, chunks), full, atol=2e-5, rtol=1e-5)


def test_last_only_is_the_last_row_of_the_full_logits() -> None:
    model = random_model(5)
    idx = tokens(2, 30)
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, last_only=True), full[:, -1:])
        cache = KVCache.for_model(model.config, 2, 30, "cpu")
        torch.testing.assert_close(model(idx, kv_cache=cache, last_only=True), full[:, -1:], atol=2e-5, rtol=1e-5)
    assert cache.get_pos() == 30  # the whole chunk still went into the cache
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_smear_state_carries_the_previous_token_across_calls() -> None:
    """Decoding token t must mix in token t-1 from the previous call: swap that token and the decoded
    logits change exactly as the full forward's do."""
    model = random_model(3)
    with torch.no_grad():
        model.smear_lambda.fill_(1.5)
    for idx in (torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 9, 8]])):
        with torch.no_grad():
            full = model(idx)
        torch.testing.assert_close(incremental_logits(model, idx, [3]), full, atol=2e-5, rtol=1e-5)
    cache = new_cache(model, 1, 8)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), kv_cache=cache)
    assert cache.prev_embedding is not None
    expected = torch.nn.functional.rms_norm(model.transformer.wte.weight[7], (64,))
    torch.testing.assert_close(cache.prev_embedding[0, 0], expected)


def test_replicated_prefill_decodes_like_separate_runs() -> None:
    model = random_model(4)
    prompt = tokens(1, 30, 1)
    continuations = tokens(3, 5, 2)
    single = new_cache(model, 1, 40)
    many = new_cache(model, 3, 40)
    with torch.no_grad():
        model(prompt, kv_cache=single)
        many.prefill(single)
        decoded = torch.cat([model(continuations[:, i:i + 1], kv_cache=many) for i in range(5)], dim=1)
        for row in range(3):
            full = model(torch.cat((prompt, continuations[row:row + 1]), dim=1))
            torch.testing.assert_close(decoded[row], full[0, 30:], atol=2e-5, rtol=1e-5)


def test_cache_errors_are_clear() -> None:
    model = random_model()
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(tokens(1, 9), kv_cache=new_cache(model, 1, 8))
    with pytest.raises(ValueError, match="does not fit"):
        model(tokens(2, 3), kv_cache=new_cache(model, 1, 8))
    with pytest.raises(TypeError, match="KVCache"):
        model(tokens(1, 3), kv_cache="cache")  # type: ignore[arg-type]
    cache = new_cache(model, 1, 8)
    cache.advance(2)  # positions claimed without going through the model: no smear state
    with pytest.raises(ValueError, match="smear state"):
        model(tokens(1, 1), kv_cache=cache)


# ---- the paged cache: rows at their own positions ----------------------------------------------------


def new_pool(model: GPT, num_slots: int, num_pages: int = 64, page_size: int = 4) -> PagedKVCache:
    return PagedKVCache.for_model(model.config, num_slots, num_pages, page_size, 128, "cpu", torch.float32)


def windowed_model(seed: int = 0) -> GPT:
    model = random_model(seed, n_layer=2, window_pattern="SL", sequence_len=128)
    model.window_sizes = [7, 128]  # so that short sequences cross layer 0's window many times
    return model


def test_paged_allocation_bookkeeping() -> None:
    pool = PagedKVCache(num_slots=2, num_pages=5, page_size=4, max_seq_len=12, num_kv_heads=1, head_dim=8,
                        num_layers=3, n_embd=16, device="cpu", dtype=torch.float32)
    assert pool.k_pages.shape == pool.v_pages.shape == (3, 5, 4, 1, 8)
    assert pool.page_table.shape == (2, 3) and pool.page_table.dtype == torch.int32
    assert pool.pages_for(1) == 1 and pool.pages_for(4) == 1 and pool.pages_for(5) == 2
    first = pool.allocate(9)  # 3 pages
    assert first == 0 and pool.length(0) == 0 and pool.capacity(0) == 9
    assert pool.free_slot_count() == 1 and pool.free_page_count() == 2
    assert not pool.can_allocate(9) and pool.can_allocate(8)
    with pytest.raises(ValueError, match="no room"):
        pool.allocate(9)
    with pytest.raises(ValueError, match="at most 12"):
        pool.allocate(13)
    second = pool.allocate(8)
    assert second == 1 and not pool.can_allocate(1)  # no slot left
    assert set(pool.page_table[0].tolist()) | set(pool.page_table[1, :2].tolist()) == set(range(5))
    pool.release(0)
    assert pool.free_slot_count() == 1 and pool.free_page_count() == 3 and pool.allocate(12) == 0
    pool.release(1)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(1)
    with pytest.raises(ValueError, match="slot must be"):
        pool.length(2)


def test_paged_rows_validation() -> None:
    model = windowed_model()
    pool = new_pool(model, 3)
    slot = pool.allocate(5)
    with pytest.raises(ValueError, match="once per forward"):
        pool.rows([slot, slot])
    with pytest.raises(ValueError, match="not allocated"):
        pool.rows([slot, 2])
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(tokens(1, 6), kv_cache=pool.rows([slot]))  # 5 positions reserved
    with pytest.raises(ValueError, match="does not fit"):
        model(tokens(2, 1), kv_cache=pool.rows([slot]))
    with pytest.raises(ValueError, match="cannot advance"):
        pool.rows([slot]).advance(6)


def test_rows_at_different_positions_decode_together_like_separate_full_forwards() -> None:
    """The continuous-batching contract: sequences prefilled separately (in chunks), then decoded one
    token per row per forward with every row at its own position, give each sequence the logits of
    its own full forward: rotary positions, window masks and smear state are all per row."""
    model = windowed_model()
    pool = new_pool(model, num_slots=4)
    sequences = [tokens(1, n, seed=n) for n in (20, 35, 33)]
    prompt_lens = [3, 28, 12]
    # allocated out of order: a forward's input rows need not follow slot order
    slot_of = {i: pool.allocate(sequences[i].size(1)) for i in (2, 0, 1)}
    slots = [slot_of[i] for i in range(len(sequences))]
    assert slots != sorted(slots)
    logits: list[list[torch.Tensor]] = [[] for _ in sequences]
    with torch.no_grad():
        for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens, strict=True)):
            for start in range(0, prompt_len, 9):  # chunked prefill, batch 1
                chunk = seq[:, start:min(start + 9, prompt_len)]
                logits[i].append(model(chunk, kv_cache=pool.rows([slots[i]]))[0])
        lengths = [seq.size(1) for seq in sequences]
        for step in range(max(length - n for length, n in zip(lengths, prompt_lens, strict=True))):
            # a row drops out of the batch once its sequence is done: the others carry on
            active = [i for i, length in enumerate(lengths) if prompt_lens[i] + step < length]
            idx = torch.cat([sequences[i][:, prompt_lens[i] + step:prompt_lens[i] + step + 1] for i in active])
            decoded = model(idx, kv_cache=pool.rows([slots[i] for i in active]))
            for row, i in enumerate(active):
                logits[i].append(decoded[row])
        for i, seq in enumerate(sequences):
            assert pool.length(slots[i]) == seq.size(1)
            torch.testing.assert_close(torch.cat(logits[i]), model(seq)[0], atol=2e-5, rtol=1e-5)


def test_a_released_slot_is_reused_without_leftovers() -> None:
    """Stale keys, lengths and smear state of a previous sequence must not leak into the next one."""
    model = windowed_model(1)
    pool = new_pool(model, num_slots=1, num_pages=10)
    with torch.no_grad():
        slot = pool.allocate(40)
        model(tokens(1, 40, seed=1), kv_cache=pool.rows([slot]))
        pool.release(slot)
        assert pool.allocate(30) == slot and pool.length(slot) == 0
        seq = tokens(1, 30, seed=2)
        prefill = model(seq[:, :25], kv_cache=pool.rows([slot]))
        decoded = [model(seq[:, t:t + 1], kv_cache=pool.rows([slot])) for t in range(25, 30)]
        torch.testing.assert_close(torch.cat([prefill, *decoded], dim=1), model(seq), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_and_windowed_training_in_the_compute_dtype() -> None:
    """On CUDA the model runs in COMPUTE_DTYPE (bf16 on SM >= 8) through FA3 or FlexAttention: the
    windowed training forward/backward is finite and the cached decode tracks the full forward."""
    model = build_model(GPTConfig(**CONFIG), "cuda")  # type: ignore[arg-type]
    with torch.no_grad():
        for block in model.transformer.h:  # non-zero output projections, so attention matters
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.smear_lambda.fill_(0.5)
    idx = tokens(2, 200).cuda()
    loss = model(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    c = model.config
    cache = KVCache(batch_size=2, num_kv_heads=c.n_kv_head, max_seq_len=200, head_dim=c.head_dim,
                    num_layers=c.n_layer, device="cuda", n_embd=c.n_embd)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :150], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(150, 200)]
    incremental = torch.cat(pieces, dim=1)
    similarity = F.cosine_similarity(incremental.flatten(1), full.flatten(1), dim=1)
    assert (similarity > 0.99).all(), similarity
