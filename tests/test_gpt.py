"""Spec for gpt.py: config and sizing, initialisation, the forward contract, accounting, the
optimizer groups, naive generation, and that a tiny model actually learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import build_gpt, randomise
from nanochat_rs.common import COMPUTE_DTYPE
from nanochat_rs.gpt import GPT, GPTConfig, Linear, compute_window_sizes, config_for_depth, padded_vocab_size
from nanochat_rs.kv_cache import KVCache
from nanochat_rs.optim import MuonAdamW

TINY = dict(sequence_len=64, vocab_size=100, n_layer=4, n_head=2, n_kv_head=1, n_embd=64)


def build(**overrides: object) -> GPT:
    return build_gpt(GPTConfig(**{**TINY, **overrides}))  # type: ignore[arg-type]


def token_batch(batch: int, length: int, seed: int = 0, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(window_pattern="SSXL"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
    (dict(window_pattern="ssl"), "window_pattern"),
    (dict(n_head=3, n_kv_head=2, n_embd=96), "multiple of n_kv_head"),
    (dict(n_head=3), "divisible by n_head"),
    (dict(n_embd=30, n_head=10, n_kv_head=10), "even"),
    (dict(n_embd=16, n_head=2), "at least 24"),
    (dict(n_layer=0), "n_layer"),
])
def test_bad_configs_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_a_config_field_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="GPTConfig.vocab_size must be an int, got float"):
        GPTConfig(**{**TINY, "vocab_size": 2.5})


@pytest.mark.parametrize(("depth", "head_dim", "dim", "heads"), [
    (12, 128, 768, 6), (20, 128, 1280, 10), (5, 128, 384, 3), (1, 128, 128, 1), (3, 32, 192, 6), (2, 48, 144, 3),
])
def test_config_for_depth_rounds_width_up_to_whole_heads(depth: int, head_dim: int, dim: int, heads: int) -> None:
    config = config_for_depth(depth, vocab_size=1000, sequence_len=512, head_dim=head_dim)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, dim, heads, heads)
    assert config.window_pattern == "SSSL" and config.sequence_len == 512 and config.vocab_size == 1000


@pytest.mark.parametrize(("sequence_len", "pattern", "n_layer", "expected"), [
    (2048, "SSSL", 6, [512, 512, 512, 2048, 512, 2048]),
    (1000, "SL", 3, [256, 1000, 1000]),  # 250 rounds up to 256; last layer forced L
    (64, "S", 2, [64, 64]),  # 16 rounds up to 128, capped at the context
    (256, "S", 3, [128, 128, 256]),
    (2048, "L", 2, [2048, 2048]),
])
def test_window_sizes(sequence_len: int, pattern: str, n_layer: int, expected: list[int]) -> None:
    config = GPTConfig(**{**TINY, "sequence_len": sequence_len, "window_pattern": pattern, "n_layer": n_layer})
    assert compute_window_sizes(config) == expected
    with torch.device("meta"):
        assert GPT(config).window_sizes == expected


# ---- initialisation ----------------------------------------------------------------------------------


def test_init_follows_the_spec() -> None:
    model = build(n_layer=5, n_embd=128, n_head=2, n_kv_head=2)
    n = 128
    torch.testing.assert_close(model.resid_lambdas.data, torch.linspace(1.15, 1.05, 5))
    torch.testing.assert_close(model.x0_lambdas.data, torch.linspace(0.20, 0.05, 5))
    assert model.resid_lambdas[0].item() == pytest.approx(1.15) and model.x0_lambdas[-1].item() == pytest.approx(0.05)
    assert model.transformer.wte.weight.float().std().item() == pytest.approx(0.8, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    bound = math.sqrt(3 / n)
    for block in model.transformer.h:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            assert linear.weight.abs().max() <= bound
            assert linear.weight.std().item() == pytest.approx(1 / math.sqrt(n), rel=0.1)
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * bound
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.4 / math.sqrt(n), rel=0.1)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        if block.attn.ve_gate is not None:
            assert 0 <= block.attn.ve_gate.weight.min() and block.attn.ve_gate.weight.max() <= 0.02
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert sorted(model.value_embeds.keys()) == ["0", "2", "4"]  # alternating, last layer included
    assert sorted(build(n_layer=4).value_embeds.keys()) == ["1", "3"]


def test_no_biases_and_casting_linears_everywhere() -> None:
    model = build()
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) and m.bias is None for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in linears)  # fp32 master weights


def test_embeddings_in_compute_dtype_and_vocab_padded() -> None:
    model = build()
    assert padded_vocab_size(100) == 128 and padded_vocab_size(128) == 128 and padded_vocab_size(129) == 192
    assert model.transformer.wte.weight.shape == (128, 64) and model.lm_head.weight.shape == (128, 64)
    assert model.transformer.wte.weight.dtype == COMPUTE_DTYPE
    assert all(e.weight.dtype == COMPUTE_DTYPE and e.weight.shape == (128, 32) for e in model.value_embeds.values())
    assert model(token_batch(1, 5)).shape == (1, 5, 100)


def test_rotary_tables_are_derived_not_saved() -> None:
    model = build()
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    assert model.cos.shape == (1, 640, 1, 16) and model.cos.dtype == COMPUTE_DTYPE  # 10 x sequence_len
    head_dim = 32
    for p, j in ((0, 0), (1, 0), (7, 3), (639, 15)):
        angle = p * 100000.0 ** (-2 * j / head_dim)
        assert model.cos[0, p, 0, j].item() == pytest.approx(math.cos(angle), abs=1e-5)
        assert model.sin[0, p, 0, j].item() == pytest.approx(math.sin(angle), abs=1e-5)


def test_init_weights_is_deterministic_under_the_seed() -> None:
    torch.manual_seed(3)
    a = build().state_dict()
    torch.manual_seed(3)
    b = build().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_model_forward_is_well_behaved() -> None:
    model = build()
    idx = token_batch(2, 64)
    loss = model(idx, targets=idx)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(100)) < 0.5  # near uniform at init


# ---- forward contract -------------------------------------------------------------------------------


def test_logits_are_soft_capped_at_15() -> None:
    model = build()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 50.0)
    logits = model(token_batch(2, 16))
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


def test_loss_is_cross_entropy_ignoring_minus_one() -> None:
    model = randomise(build())
    idx = token_batch(2, 12, seed=1)
    targets = token_batch(2, 12, seed=2)
    targets[0, :4] = -1
    targets[1, -1] = -1
    with torch.no_grad():
        logits = model(idx)
        flat_logits, flat_targets = logits.reshape(-1, 100), targets.reshape(-1)
        keep = flat_targets != -1
        expected = F.cross_entropy(flat_logits[keep], flat_targets[keep], reduction="none")
        per_token = model(idx, targets, loss_reduction="none")
        assert per_token.shape == (24,)
        torch.testing.assert_close(per_token[keep], expected)
        assert not per_token[~keep].any()
        torch.testing.assert_close(model(idx, targets), expected.mean())
        torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), expected.sum())


def test_logits_at_returns_the_masked_positions_only_in_row_major_order() -> None:
    model = randomise(build())
    idx = token_batch(3, 12, seed=3)
    mask = token_batch(3, 12, seed=4, vocab=2).bool()
    with torch.no_grad():
        full = model(idx)
        selected = model(idx, logits_at=mask)
        assert selected.shape == (int(mask.sum()), 100) and 0 < mask.sum() < mask.numel()
        torch.testing.assert_close(selected, full[mask])
        assert model(idx, logits_at=torch.zeros_like(mask)).shape == (0, 100)
        # after a KV-cache prefill the mask covers the new chunk, whose positions continue the cache
        cache = KVCache.for_model(model.config, batch_size=3, max_seq_len=12, device="cpu")
        model(idx[:, :5], kv_cache=cache, logits_at=torch.zeros(3, 5, dtype=torch.bool))
        continued = model(idx[:, 5:], kv_cache=cache, logits_at=mask[:, 5:])
        torch.testing.assert_close(continued, full[:, 5:][mask[:, 5:]], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(logits_at=torch.ones(2, 8, dtype=torch.long)), r"bool mask of shape \(B=2, T_full=8\), got torch.int64"),
    (dict(logits_at=torch.ones(2, 7, dtype=torch.bool)), r"\(B=2, T_full=8\), got torch.bool \(2, 7\)"),
    (dict(logits_at=[[True] * 8] * 2), "torch.bool mask .* got list"),
    (dict(logits_at=torch.ones(2, 8, dtype=torch.bool), last_only=True), "cannot be combined"),
    (dict(logits_at=torch.ones(2, 8, dtype=torch.bool), targets=token_batch(2, 8)), "cannot be combined"),
])
def test_logits_at_must_be_a_boolean_mask_over_the_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()(token_batch(2, 8), **kwargs)


@settings(max_examples=10, deadline=None)
@given(position=st.integers(0, 29), new_token=st.integers(0, 99), seed=st.integers(0, 20))
def test_causality(position: int, new_token: int, seed: int) -> None:
    """Changing token t leaves every logit before t unchanged (smear included)."""
    model = CAUSAL_MODEL
    idx = token_batch(1, 30, seed=seed)
    changed = idx.clone()
    changed[0, position] = new_token
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :position], b[:, :position], atol=0, rtol=0)


CAUSAL_MODEL = randomise(build(sequence_len=128, window_pattern="SL"), seed=7)


def test_forward_rejects_bad_inputs_clearly() -> None:
    model = build()
    idx = token_batch(2, 8)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(idx[0])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(idx[:, :0])
    with pytest.raises(TypeError, match="integer token ids"):
        model(idx.float())
    with pytest.raises(TypeError, match="LongTensor"):
        model([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets have length 7"):
        model(idx, targets=idx[:, :7])
    with pytest.raises(ValueError, match="targets must be"):
        model(idx, targets=idx[0])
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets=idx, loss_reduction="avg")
    with pytest.raises(ValueError, match="rotary table"):
        model(token_batch(1, 641))


# ---- accounting ---------------------------------------------------------------------------------------


def test_parameter_counts_partition_the_model() -> None:
    model = build()
    counts = model.num_scaling_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["embedding"] + counts["matrix"] + counts["lm_head"] + counts["scalars"]
    assert counts["lm_head"] == 128 * 64
    assert counts["embedding"] == 128 * 64 + 2 * 128 * 32  # wte + two value-embedding tables
    assert counts["matrix"] == sum(p.numel() for p in model.transformer.h.parameters())
    assert counts["scalars"] == 4 + 4 + 24 + 1 + 1
    with torch.device("meta"):
        assert GPT(GPTConfig(**TINY)).num_scaling_params() == counts  # countable without memory


def test_flops_estimate() -> None:
    model = build(sequence_len=1024, window_pattern="SSSL")
    counts = model.num_scaling_params()
    attention = 12 * 2 * 32 * (256 * 3 + 1024)
    assert model.estimate_flops() == 6 * (counts["matrix"] + counts["lm_head"]) + attention


def test_setup_optimizer_groups_cover_every_parameter_once() -> None:
    model = build()
    optimizer = model.setup_optimizer()
    assert isinstance(optimizer, MuonAdamW)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    block_matrices = {id(p) for p in model.transformer.h.parameters()}
    for group in optimizer.param_groups:
        assert group["kind"] in ("adamw", "muon") and group["initial_lr"] == group["lr"] > 0
        if group["kind"] == "muon":
            assert len({tuple(p.shape) for p in group["params"]}) == 1
            assert all(id(p) in block_matrices for p in group["params"])
            assert group["weight_decay"] == pytest.approx(0.28)
        else:
            assert not any(id(p) in block_matrices for p in group["params"])


# ---- training ----------------------------------------------------------------------------------------


def markov_text(batch: int, length: int, generator: torch.Generator, vocab: int = 100) -> torch.Tensor:
    """Sequences from a fixed sparse Markov chain: each token has two equally likely successors."""
    successors = torch.randint(0, vocab, (vocab, 2), generator=torch.Generator().manual_seed(123))
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for t in range(1, length):
        choice = torch.randint(0, 2, (batch,), generator=generator)
        seq[:, t] = successors[seq[:, t - 1], choice]
    return seq


def test_tiny_model_learns_generated_text() -> None:
    torch.manual_seed(0)
    model = build(n_layer=2, sequence_len=32)
    optimizer = model.setup_optimizer()
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        batch = markov_text(16, 33, generator)
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-10:]) / 10
    # uniform is ln(100) = 4.6, the chain's entropy ln(2) = 0.69: the model must find the successors
    assert first > 4.0
    assert last < 1.0, f"loss went {first:.2f} -> {last:.2f}"


# ---- naive generation ----------------------------------------------------------------------------------


GEN_MODEL = randomise(build(), seed=11).eval()


def test_greedy_generation_is_the_step_by_step_argmax() -> None:
    prompt = [1, 2, 3, 4]
    generated = list(GEN_MODEL.generate(prompt, 12, temperature=0.0))
    assert len(generated) == 12 and generated == list(GEN_MODEL.generate(prompt, 12, temperature=0))
    sequence = list(prompt)
    with torch.no_grad():
        for token in generated:
            logits = GEN_MODEL(torch.tensor([sequence]))[0, -1]
            assert token == int(logits.argmax())
            sequence.append(token)


def test_sampling_is_seeded_and_top_k_one_is_greedy() -> None:
    prompt = [5, 6]
    a = list(GEN_MODEL.generate(prompt, 20, temperature=1.0, seed=1))
    assert a == list(GEN_MODEL.generate(prompt, 20, temperature=1.0, seed=1))
    assert a != list(GEN_MODEL.generate(prompt, 20, temperature=1.0, seed=2))
    assert all(0 <= t < 100 for t in a)
    greedy = list(GEN_MODEL.generate(prompt, 10, temperature=0.0))
    assert list(GEN_MODEL.generate(prompt, 10, temperature=0.7, top_k=1, seed=9)) == greedy
    assert list(GEN_MODEL.generate(prompt, 0)) == []


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    (([], 5), {}, "empty"),
    (("hello", 5), {}, "list of token ids"),
    (([1, 100], 5), {}, r"tokens\[1\]"),
    (([1, -1], 5), {}, r"tokens\[1\]"),
    (([1, True], 5), {}, r"tokens\[1\]"),
    (([1], -1), {}, "max_tokens"),
    (([1], 5), {"temperature": -0.5}, "temperature"),
    (([1], 5), {"temperature": float("nan")}, "temperature"),
    (([1], 5), {"top_k": 0}, "top_k"),
    (([1], 5), {"seed": "x"}, "seed"),
    (([1], 641), {}, "rotary table"),
])
def test_generate_rejects_bad_arguments_on_the_call(args: tuple, kwargs: dict, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        GEN_MODEL.generate(*args, **kwargs)
