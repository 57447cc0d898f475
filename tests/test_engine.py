"""The KV-cache Engine: it must produce exactly what naive full-recompute generation produces, sample
reproducibly, stop rows correctly and force calculator output into the stream."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import random_gpt, record_fed_tokens
from nanochat_rs import engine as engine_module
from nanochat_rs import kv_cache
from nanochat_rs.engine import Engine, KVCache, sample_next_token
from nanochat_rs.gpt import GPT, GPTConfig
from nanochat_rs.sampling import MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE, check_sampling_args
from nanochat_rs.tokenizer import Tokenizer

_CORPUS = ["The quick brown fox jumps over the lazy dog. 12 + 30 = 42, and 7 * 6 is 42 too!",
           "hello world, how are you today? I am fine, thanks for asking. 1+2+3=6"]


def small_tokenizer() -> Tokenizer:
    """A tokenizer trained in a blink on a tiny corpus with digits and words (shared with test_batching)."""
    return Tokenizer.train(_CORPUS * 20, vocab_size=256 + 9 + 50)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_tokenizer()


def make_model(tok: Tokenizer, *, sequence_len: int = 64, window_pattern: str = "L", n_layer: int = 2,
               n_head: int = 2, n_kv_head: int = 2, n_embd: int = 64, seed: int = 0) -> GPT:
    """A tiny fully random GPT (see model_helpers.randomise) which never prefers a stop token, so runs
    reach their full length."""
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=window_pattern)
    model = random_gpt(config, seed)
    with torch.no_grad():
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tok.encode_special(name)] = 0.0  # logit exactly 0: never the argmax
    return model


def random_prompt(tok: Tokenizer, length: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [tok.bos_token_id] + torch.randint(0, 256, (length - 1,), generator=generator).tolist()


def columns(stream: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Transpose a generate() stream into per-row token lists and mask lists."""
    tokens: list[list[int]] = []
    masks: list[list[int]] = []
    for column, column_masks in stream:
        if not tokens:
            tokens, masks = [[] for _ in column], [[] for _ in column]
        for i, (t, m) in enumerate(zip(column, column_masks, strict=True)):
            tokens[i].append(t)
            masks[i].append(m)
    return tokens, masks


def naive_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    return list(model.generate(prompt, max_tokens, temperature=0.0))


# ---- equivalence with naive generation ---------------------------------------------------------


def test_kv_cache_is_re_exported() -> None:
    assert KVCache is kv_cache.KVCache


def test_the_engine_module_is_a_library_not_a_job() -> None:
    """Jobs are `nanochat-<job>` modules; the engine has no command line of its own (nor the
    checkpoint loading and device setup a command line would pull in)."""
    source = inspect.getsource(engine_module)
    for job_only in ("argparse", "__main__", "nanochat_rs.checkpoint", "nanochat_rs.common"):
        assert job_only not in source


@pytest.mark.parametrize(("prompt_len", "max_tokens", "n_kv_head"), [(1, 24, 2), (20, 30, 1)])
def test_greedy_equals_naive_generation(tok: Tokenizer, prompt_len: int, max_tokens: int, n_kv_head: int) -> None:
    model = make_model(tok, n_kv_head=n_kv_head, window_pattern="SL")
    prompt = random_prompt(tok, prompt_len)
    expected = naive_greedy(model, prompt, max_tokens)
    tokens, masks = columns(Engine(model, tok).generate(prompt, max_tokens=max_tokens, temperature=0.0))
    assert tokens == [expected]
    assert masks == [[1] * max_tokens]


def test_greedy_equals_naive_past_the_sliding_window(tok: Tokenizer) -> None:
    """Short-window layers must forget old keys identically in chunked prefill and in decode."""
    model = make_model(tok, sequence_len=512, window_pattern="SL")  # short window: 128
    prompt = random_prompt(tok, 100, seed=1)
    max_tokens = 100
    assert len(prompt) < min(model.window_sizes) < len(prompt) + max_tokens  # decoding crosses the window
    expected = naive_greedy(model, prompt, max_tokens)
    tokens, _ = columns(Engine(model, tok).generate(prompt, max_tokens=max_tokens, temperature=0.0))
    assert tokens == [expected]


def test_greedy_equals_naive_with_a_prompt_longer_than_the_window(tok: Tokenizer) -> None:
    model = make_model(tok, sequence_len=640, window_pattern="SL", seed=2)
    prompt = random_prompt(tok, 300, seed=2)
    assert min(model.window_sizes) < len(prompt)
    expected = naive_greedy(model, prompt, 12)
    tokens, _ = columns(Engine(model, tok).generate(prompt, max_tokens=12, temperature=0.0))
    assert tokens == [expected]


def test_greedy_samples_are_identical_rows(tok: Tokenizer) -> None:
    """The batch-1 prefill replicated into N rows must behave exactly like N separate runs."""
    model = make_model(tok, window_pattern="SL")
    prompt = random_prompt(tok, 10)
    expected = naive_greedy(model, prompt, 16)
    tokens, _ = columns(Engine(model, tok).generate(prompt, num_samples=3, max_tokens=16, temperature=0.0))
    assert tokens == [expected] * 3


def test_top_k_one_is_greedy(tok: Tokenizer) -> None:
    model = make_model(tok)
    prompt = random_prompt(tok, 8)
    engine = Engine(model, tok)
    greedy = columns(engine.generate(prompt, max_tokens=12, temperature=0.0))[0]
    assert columns(engine.generate(prompt, max_tokens=12, temperature=1.5, top_k=1, seed=7))[0] == greedy


# ---- sampling ----------------------------------------------------------------------------------


def test_samples_differ_but_are_reproducible(tok: Tokenizer) -> None:
    model = make_model(tok)
    engine = Engine(model, tok)
    prompt = random_prompt(tok, 6)

    def run(seed: int) -> list[list[int]]:
        return columns(engine.generate(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=seed))[0]

    first = run(123)
    assert len(first) == 4
    assert len({tuple(row) for row in first}) > 1, "independent samples should not all coincide"
    assert run(123) == first
    assert run(124) != first


def test_generate_batch_returns_prompt_plus_completion(tok: Tokenizer) -> None:
    model = make_model(tok)
    engine = Engine(model, tok)
    prompt = random_prompt(tok, 5)
    streamed = columns(engine.generate(prompt, num_samples=2, max_tokens=9, temperature=0.8, seed=3))[0]
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=9, temperature=0.8, seed=3)
    assert results == [prompt + row for row in streamed]
    assert masks == [[0] * len(prompt) + [1] * 9] * 2


@given(data=st.data(), rows=st.integers(1, 4), vocab=st.integers(2, 40), top_k=st.integers(1, 45),
       temperature=st.floats(0.05, 3.0))
@settings(max_examples=60, deadline=None)
def test_sampled_tokens_come_from_the_top_k(data: st.DataObject, rows: int, vocab: int, top_k: int,
                                            temperature: float) -> None:
    seed = data.draw(st.integers(0, 2**31))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    sampled = sample_next_token(logits, torch.Generator().manual_seed(seed), temperature, top_k)
    assert sampled.shape == (rows,) and sampled.dtype == torch.long
    allowed = torch.topk(logits, min(top_k, vocab), dim=-1).indices
    for row in range(rows):
        assert sampled[row].item() in allowed[row].tolist()


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, MAX_TEMPERATURE])
def test_the_extreme_allowed_temperatures_sample_real_tokens(temperature: float) -> None:
    """The bounds of check_sampling_args leave softmax finite for logits far beyond the model's
    soft cap of 15, with and without a top-k mask."""
    logits = torch.tensor([[1e3, -1e3, 0.0, 15.0], [-15.0, 15.0, 3.0, 2.0]])
    for top_k in (None, 2):
        sampled = sample_next_token(logits, torch.Generator().manual_seed(0), temperature, top_k)
        assert all(0 <= token < 4 for token in sampled.tolist())
    check_sampling_args(1, temperature, None, MAX_SEED)
    torch.Generator().manual_seed(MAX_SEED)  # the largest seed the check allows is one torch takes


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    """probs 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (they reach 0.8), 0.81 needs a third."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, -1)
    # 1e-46 is 0 in fp32: the best token still stays (an empty nucleus would make multinomial fail)
    for top_p, allowed in ((0.8, {0, 1}), (0.81, {0, 1, 2}), (1e-9, {0}), (1e-46, {0}), (5e-324, {0}),
                           (1.0, {0, 1, 2, 3})):
        sampled = sample_next_token(logits, torch.Generator().manual_seed(0), 1.0, top_p=top_p)
        assert set(sampled.tolist()) == allowed, top_p
    # the kept tokens keep their relative odds: 0.5 : 0.3
    sampled = sample_next_token(logits, torch.Generator().manual_seed(1), 1.0, top_p=0.8)
    assert abs((sampled == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_a_tiny_top_p_is_greedy(tok: Tokenizer) -> None:
    engine = Engine(make_model(tok), tok)
    prompt = random_prompt(tok, 8)
    greedy = columns(engine.generate(prompt, max_tokens=12, temperature=0.0))[0]
    assert columns(engine.generate(prompt, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3))[0] == greedy


def test_temperature_zero_is_argmax_and_ignores_the_generator() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next_token(logits, torch.Generator(), 0.0).tolist() == [1, 0]
    assert sample_next_token(logits, torch.Generator(), 0.0, top_k=2).tolist() == [1, 0]


def test_sampling_follows_the_softmax() -> None:
    """Empirical frequencies match softmax(logits / T) (a wrong temperature or mask would skew them)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).expand(20000, -1)
    sampled = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=2.0)
    frequencies = torch.bincount(sampled, minlength=4).float() / len(sampled)
    assert torch.allclose(frequencies, torch.softmax(logits[0] / 2.0, dim=-1), atol=0.015)


# ---- stopping, tools, limits (scripted sampler) ---------------------------------------------------


def scripted_sampler(scripts: list[list[int]], filler: int) -> Callable[..., torch.Tensor]:
    """A stand-in for sample_next_token: row i 'samples' scripts[i][step] (then `filler` forever)."""
    step = 0

    def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int | None,
               top_p: float | None = None) -> torch.Tensor:
        nonlocal step
        assert logits.shape[0] == len(scripts)
        out = [script[step] if step < len(script) else filler for script in scripts]
        step += 1
        return torch.tensor(out)

    return sample


def test_calculator_output_is_forced_with_mask_zero(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = tok.encode_special
    good = [sp("<|python_start|>"), *tok.encode("12 + 30"), sp("<|python_end|>")]
    bad = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    filler = tok.encode("a")[0]
    monkeypatch.setattr(engine_module, "sample_next_token", scripted_sampler([good, bad], filler))
    model = make_model(tok)
    fed = record_fed_tokens(model, monkeypatch)
    steps = max(len(good) + len(forced), len(bad)) + 2
    prompt = random_prompt(tok, 4)
    tokens, masks = columns(Engine(model, tok).generate(prompt, num_samples=2, max_tokens=steps))

    after = steps - len(good) - len(forced)
    assert tokens[0] == good + forced + [filler] * after
    assert masks[0] == [1] * len(good) + [0] * len(forced) + [1] * after
    # a refused expression (no value) forces nothing: the row just keeps sampling
    assert tokens[1] == bad + [filler] * (steps - len(bad))
    assert masks[1] == [1] * steps
    # the forced tokens really went into the model's context, in order
    assert fed[0] == [prompt]
    assert [step[0][0] for step in fed[1:]] == tokens[0][:-1]


def test_rows_stop_on_assistant_end_or_bos(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    end, bos = tok.encode_special("<|assistant_end|>"), tok.bos_token_id
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    monkeypatch.setattr(engine_module, "sample_next_token", scripted_sampler([[a, end], [a, b, b, bos]], a))
    engine = Engine(make_model(tok), tok)
    prompt = random_prompt(tok, 3)
    tokens, masks = columns(engine.generate(prompt, num_samples=2, max_tokens=50))
    # generation ends when the last row stops; a finished row repeats its stop token, unsampled
    assert tokens == [[a, end, end, end], [a, b, b, bos]]
    assert masks == [[1, 1, 0, 0], [1, 1, 1, 1]]

    monkeypatch.setattr(engine_module, "sample_next_token", scripted_sampler([[a, end], [a, b, b, bos]], a))
    results, result_masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50)
    assert results == [prompt + [a], prompt + [a, b, b]]
    assert result_masks == [[0] * 3 + [1], [0] * 3 + [1, 1, 1]]


def test_generation_stops_when_the_context_is_full(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tok.encode("a")[0]
    monkeypatch.setattr(engine_module, "sample_next_token", scripted_sampler([[]], a))
    model = make_model(tok, sequence_len=32)
    prompt = random_prompt(tok, 20)
    tokens, _ = columns(Engine(model, tok).generate(prompt))  # max_tokens=None: up to sequence_len
    # the model sees at most sequence_len positions; the token sampled from the last one is emitted too
    assert len(tokens[0]) == 32 - 20 + 1


def test_max_tokens_bounds_the_steps(tok: Tokenizer) -> None:
    engine = Engine(make_model(tok), tok)
    prompt = random_prompt(tok, 4)
    assert columns(engine.generate(prompt, num_samples=2, max_tokens=5))[0] == \
        columns(engine.generate(prompt, num_samples=2, max_tokens=5))[0]
    assert all(len(row) == 5 for row in columns(engine.generate(prompt, num_samples=2, max_tokens=5))[0])
    assert list(engine.generate(prompt, max_tokens=0)) == []


def test_the_caller_is_not_left_in_inference_mode(tok: Tokenizer) -> None:
    stream = Engine(make_model(tok), tok).generate(random_prompt(tok, 3), max_tokens=3)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    list(stream)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(tokens=[]), ValueError, "empty"),
    (dict(tokens="hello"), TypeError, "list of token ids"),
    (dict(tokens=[1, 10**6]), ValueError, r"tokens\[1\]"),
    (dict(tokens=[1, -1]), ValueError, r"tokens\[1\]"),
    (dict(tokens=[1.0]), ValueError, r"tokens\[0\]"),
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(max_tokens=-1), ValueError, "max_tokens"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=1e-40), ValueError, "use 0 for greedy"),  # 1/T overflows: softmax would be NaN
    (dict(temperature=1e308), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_p="0.9"), TypeError, "top_p"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "64 bits"),  # torch.Generator.manual_seed overflows
    (dict(seed=-1), ValueError, "64 bits"),
    (dict(tokens=list(range(64))), ValueError, "fills the model's context"),
])
def test_bad_arguments_fail_early_and_clearly(tok: Tokenizer, kwargs: dict[str, Any], error: type,
                                              match: str) -> None:
    engine = Engine(make_model(tok, sequence_len=64), tok)
    call = {"tokens": [tok.bos_token_id], **kwargs}
    with pytest.raises(error, match=match):
        engine.generate(**call)  # raised at the call, not at the first next()
    with pytest.raises(error, match=match):
        engine.generate_batch(**call)
