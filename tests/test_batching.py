"""The continuous-batching scheduler: every request gets exactly what the Engine would give it alone,
whatever else runs beside it, while requests join, prefill in chunks, finish, cancel and reuse slots."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from model_helpers import record_fed_tokens
from nanochat_rs import batching
from nanochat_rs import engine as engine_module
from nanochat_rs.batching import (
    BatchScheduler,
    Event,
    Finished,
    QueueFull,
    RequestFailed,
    RequestHandle,
    SamplingParams,
    SchedulerClosed,
    TokenEvent,
)
from nanochat_rs.engine import Engine, SpecialTokens
from nanochat_rs.gpt import GPT
from nanochat_rs.tokenizer import Tokenizer
from test_engine import make_model, random_prompt, small_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> GPT:
    model = make_model(tok, sequence_len=128, window_pattern="SL")
    model.window_sizes = [9, 128]  # short window crossed by most requests below
    return model


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def run_until_idle(scheduler: BatchScheduler, limit: int = 2000) -> int:
    """Step until there is no work left; returns the number of working steps."""
    for steps in range(limit):
        if not scheduler.step():
            return steps
    raise AssertionError(f"the scheduler still had work after {limit} steps")


def tokens_of(handle: RequestHandle) -> list[int]:
    return [event.token for event in handle]


def engine_tokens(engine: Engine, prompt: list[int], **kwargs: Any) -> list[int]:
    """One Engine sample, cut before its stop token (the scheduler does not stream stop tokens)."""
    out = []
    stop = SpecialTokens.of(engine.tokenizer).stop
    for column, _ in engine.generate(prompt, **kwargs):
        if column[0] in stop:
            break
        out.append(column[0])
    return out


class Recorder:
    """on_event callback collecting a request's events as the scheduler emits them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if isinstance(e, TokenEvent)]


def scripted_by_seed(scripts: dict[int, list[int]], filler: int) -> Callable[..., torch.Tensor]:
    """A stand-in for sample_next_token: the generator seeded with s 'samples' scripts[s] in order,
    then `filler`. It serves the Engine and the scheduler alike (both draw once per step per sample)."""
    draws: Counter[int] = Counter()

    def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int | None,
               top_p: float | None = None) -> torch.Tensor:
        seed = generator.initial_seed()
        script, step = scripts.get(seed, []), draws[seed]
        draws[seed] += 1
        return torch.full((logits.size(0),), script[step] if step < len(script) else filler, dtype=torch.long)

    return sample


# ---- equivalence with the Engine ----------------------------------------------------------------


def test_greedy_requests_joining_at_different_times_equal_the_engine(tok: Tokenizer, model: GPT,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(model, tok)
    cases = [(1, 30), (23, 12), (50, 25), (5, 20), (14, 1)]  # (prompt length, max_tokens)
    prompts = [random_prompt(tok, n, seed=n) for n, _ in cases]
    expected = [engine_tokens(engine, prompt, max_tokens=max_tokens, temperature=0.0)
                for prompt, (_, max_tokens) in zip(prompts, cases, strict=True)]
    fed = record_fed_tokens(model, monkeypatch)
    scheduler = BatchScheduler(model, tok, max_batch_size=3, prefill_chunk=8, page_size=4)
    handles = []
    for prompt, (_, max_tokens) in zip(prompts, cases, strict=True):
        handles.append(scheduler.submit(prompt, greedy(max_tokens)))
        for _ in range(4):  # the next request arrives while these are mid-flight
            scheduler.step()
    run_until_idle(scheduler)
    assert [tokens_of(h) for h in handles] == expected
    assert all(h.finish_reason == "length" for h in handles)
    assert max(len(ids) for ids in fed) == 3  # rows at different positions did share forwards
    assert scheduler.load() == batching.SchedulerLoad(running=0, waiting=0, free_slots=3,
                                                      free_kv_positions=3 * 128)


def test_same_seed_same_tokens_whatever_shares_the_batch(tok: Tokenizer, model: GPT) -> None:
    engine = Engine(model, tok)
    prompt = random_prompt(tok, 12, seed=3)
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=7)

    def run(with_others: bool) -> list[int]:
        scheduler = BatchScheduler(model, tok, max_batch_size=4, prefill_chunk=16)
        if with_others:
            scheduler.submit(random_prompt(tok, 30, seed=1), SamplingParams(max_tokens=40, seed=1))
            scheduler.step()
        handle = scheduler.submit(prompt, params)
        if with_others:
            scheduler.step()
            scheduler.submit(random_prompt(tok, 5, seed=2), SamplingParams(max_tokens=10, temperature=0.7, seed=2))
        run_until_idle(scheduler)
        return tokens_of(handle)

    alone = run(with_others=False)
    assert run(with_others=True) == alone
    assert alone == engine_tokens(engine, prompt, max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=7)


def test_submit_many_gives_consecutive_seeds(tok: Tokenizer, model: GPT) -> None:
    prompt = random_prompt(tok, 6, seed=4)
    scheduler = BatchScheduler(model, tok, max_batch_size=4)
    many = scheduler.submit_many(prompt, SamplingParams(max_tokens=10, seed=100), n=3)
    singles = [scheduler.submit(prompt, SamplingParams(max_tokens=10, seed=100 + i)) for i in range(3)]
    run_until_idle(scheduler)
    samples = [tokens_of(h) for h in many]
    assert samples == [tokens_of(h) for h in singles]
    assert len({tuple(s) for s in samples}) > 1, "different seeds should give different samples"


# ---- scheduling ---------------------------------------------------------------------------------


def test_a_request_joins_the_running_batch_at_the_next_token_boundary(tok: Tokenizer, model: GPT) -> None:
    scheduler = BatchScheduler(model, tok, max_batch_size=2)
    first, second = Recorder(), Recorder()
    scheduler.submit(random_prompt(tok, 6), greedy(None), on_event=first)
    for _ in range(3):
        scheduler.step()
    before = len(first.tokens)
    scheduler.submit(random_prompt(tok, 9, seed=1), greedy(None), on_event=second)
    scheduler.step()
    # one step later the newcomer has streamed, and the running request went on by exactly one token
    assert len(second.tokens) >= 1
    assert len(first.tokens) == before + 1
    for _ in range(3):
        scheduler.step()
    assert len(first.tokens) == before + 4 and scheduler.load().running == 2


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tok: Tokenizer, model: GPT,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(model, tok)
    long_prompt = random_prompt(tok, 100, seed=5)
    scheduler = BatchScheduler(model, tok, max_batch_size=2, prefill_chunk=8)
    running, long = Recorder(), Recorder()
    scheduler.submit(random_prompt(tok, 4), greedy(40), on_event=running)
    scheduler.step()
    fed = record_fed_tokens(model, monkeypatch)
    handle = scheduler.submit(long_prompt, greedy(5), on_event=long)
    decoded_meanwhile = 0
    while not long.tokens:
        before = len(running.tokens)
        scheduler.step()
        decoded_meanwhile += len(running.tokens) - before
    # 100 prompt tokens in chunks of 8 take 13 steps; the running request decoded in every one of them
    assert decoded_meanwhile == 13
    assert max(len(ids[0]) for ids in fed) == 8
    run_until_idle(scheduler)
    assert tokens_of(handle) == engine_tokens(engine, long_prompt, max_tokens=5, temperature=0.0)


def test_finished_slots_are_reused_by_waiting_requests(tok: Tokenizer, model: GPT) -> None:
    engine = Engine(model, tok)
    prompts = [random_prompt(tok, n, seed=n) for n in (7, 19, 3)]
    scheduler = BatchScheduler(model, tok, max_batch_size=1, max_queue=2)
    handles = [scheduler.submit(p, greedy(6)) for p in prompts]
    scheduler.step()
    assert scheduler.load().running == 1 and scheduler.load().waiting == 2
    run_until_idle(scheduler)
    assert [tokens_of(h) for h in handles] == [engine_tokens(engine, p, max_tokens=6, temperature=0.0)
                                               for p in prompts]


def test_the_queue_is_bounded_and_a_full_scheduler_raises_queue_full(tok: Tokenizer, model: GPT) -> None:
    scheduler = BatchScheduler(model, tok, max_batch_size=1, max_queue=2)
    prompt = random_prompt(tok, 4)
    handles = [scheduler.submit(prompt, greedy(3)) for _ in range(2)]
    with pytest.raises(QueueFull):
        scheduler.submit_many(prompt, greedy(3), n=2)  # all or none: one would still fit
    assert scheduler.load().waiting == 2
    handles.append(scheduler.submit(prompt, greedy(3)))
    scheduler.step()  # admission moves one request from the queue into the batch: still 3 held
    with pytest.raises(QueueFull, match="1 running \\+ 2 waiting"):
        scheduler.submit(prompt, greedy(3))
    run_until_idle(scheduler)
    assert [h.finish_reason for h in handles] == ["length"] * 3
    scheduler.submit(prompt, greedy(3))  # room again


def test_the_kv_budget_holds_requests_back_until_positions_free_up(tok: Tokenizer, model: GPT) -> None:
    # each request reserves prompt 10 + max_tokens 21 - 1 = 30 positions; the budget holds one
    scheduler = BatchScheduler(model, tok, max_batch_size=2, kv_token_budget=40, page_size=4)
    prompt = random_prompt(tok, 10)
    first, second = scheduler.submit(prompt, greedy(21)), scheduler.submit(prompt, greedy(21))
    scheduler.step()
    load = scheduler.load()
    assert (load.running, load.waiting, load.free_slots, load.free_kv_positions) == (1, 1, 1, 8)
    run_until_idle(scheduler)
    first_tokens = tokens_of(first)
    assert len(first_tokens) == 21 and tokens_of(second) == first_tokens
    with pytest.raises(ValueError, match="needs 45 KV positions"):
        scheduler.submit(prompt, greedy(36))


def test_cancelling_frees_the_slot_at_the_next_step(tok: Tokenizer, model: GPT) -> None:
    scheduler = BatchScheduler(model, tok, max_batch_size=1)
    running, waiting = Recorder(), Recorder()
    cancelled = scheduler.submit(random_prompt(tok, 5), greedy(None), on_event=running)
    successor = scheduler.submit(random_prompt(tok, 5, seed=1), greedy(4), on_event=waiting)
    never_runs = scheduler.submit(random_prompt(tok, 5, seed=2), greedy(4))
    for _ in range(3):
        scheduler.step()
    assert not waiting.events
    cancelled.cancel()
    never_runs.cancel()
    streamed = len(running.tokens)
    scheduler.step()
    assert running.events[-1] == Finished("cancelled") and len(running.tokens) == streamed
    assert waiting.tokens, "the freed slot went to the next request in the same step"
    assert never_runs.get(timeout=0) == Finished("cancelled")
    run_until_idle(scheduler)
    assert successor.finish_reason == "length"
    successor.cancel()  # too late: no effect
    assert successor.finish_reason == "length" and scheduler.load().free_slots == 1


# ---- tools, stops and limits (scripted sampler) ----------------------------------------------------


def test_calculator_output_is_forced_per_row(tok: Tokenizer, model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = tok.encode_special
    good = [sp("<|python_start|>"), *tok.encode("12 + 30"), sp("<|python_end|>")]
    bad = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    filler = tok.encode("a")[0]
    scripts = {1: good, 2: bad, 3: []}
    steps = max(len(good) + len(forced), len(bad)) + 2
    prompt = random_prompt(tok, 4)
    monkeypatch.setattr(batching, "sample_next_token", scripted_by_seed(scripts, filler))
    scheduler = BatchScheduler(model, tok, max_batch_size=3)
    handles = {seed: scheduler.submit(prompt, SamplingParams(max_tokens=steps, seed=seed)) for seed in scripts}
    run_until_idle(scheduler)
    events = {seed: list(handle) for seed, handle in handles.items()}
    after = steps - len(good) - len(forced)
    assert [e.token for e in events[1]] == good + forced + [filler] * after
    assert [e.forced for e in events[1]] == [False] * len(good) + [True] * len(forced) + [False] * after
    # a refused expression forces nothing; a row without a tool call is untouched by its neighbours'
    assert [e.token for e in events[2]] == bad + [filler] * (steps - len(bad))
    assert [e.token for e in events[3]] == [filler] * steps
    assert not any(e.forced for seed in (2, 3) for e in events[seed])
    # exactly what the Engine does with the same draws
    monkeypatch.setattr(engine_module, "sample_next_token", scripted_by_seed(scripts, filler))
    for seed in scripts:
        assert [e.token for e in events[seed]] == engine_tokens(Engine(model, tok), prompt, max_tokens=steps, seed=seed)


def test_forced_tokens_are_fed_to_the_model(tok: Tokenizer, model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("6*7"), sp("<|python_end|>")]
    monkeypatch.setattr(batching, "sample_next_token", scripted_by_seed({1: call}, tok.encode("a")[0]))
    fed = record_fed_tokens(model, monkeypatch)
    prompt = random_prompt(tok, 4)
    scheduler = BatchScheduler(model, tok, max_batch_size=1)
    handle = scheduler.submit(prompt, SamplingParams(max_tokens=12, seed=1))
    run_until_idle(scheduler)
    streamed = tokens_of(handle)
    assert sp("<|output_end|>") in streamed
    assert [token for ids in fed for token in ids[0]] == prompt + streamed[:-1]


def test_stop_tokens_end_a_request_with_stop(tok: Tokenizer, model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    end, bos = tok.encode_special("<|assistant_end|>"), tok.bos_token_id
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    monkeypatch.setattr(batching, "sample_next_token", scripted_by_seed({1: [a, a, end], 2: [a, bos], 3: [a, b]}, a))
    scheduler = BatchScheduler(model, tok, max_batch_size=3)
    handles = [scheduler.submit(random_prompt(tok, 3), SamplingParams(seed=1)),
               scheduler.submit(random_prompt(tok, 3), SamplingParams(seed=2)),
               scheduler.submit(random_prompt(tok, 3), SamplingParams(seed=3, stop_token_ids=[b]))]
    run_until_idle(scheduler)
    # the stop token itself is not streamed
    assert [tokens_of(h) for h in handles] == [[a, a], [a], [a]]
    assert [h.finish_reason for h in handles] == ["stop"] * 3
    assert scheduler.load().free_slots == 3


def test_max_tokens_and_a_full_context_finish_with_length(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tok, sequence_len=32)
    engine = Engine(model, tok)
    prompt = random_prompt(tok, 20)
    scheduler = BatchScheduler(model, tok, max_batch_size=2)
    capped = scheduler.submit(prompt, greedy(5))
    unbounded = scheduler.submit(prompt, greedy(None))  # greedy never picks a stop token (make_model)
    run_until_idle(scheduler)
    assert len(tokens_of(capped)) == 5 and capped.finish_reason == "length"
    # the context of 32 positions allows 32 - 20 + 1 tokens, exactly as many as the Engine gives
    streamed = tokens_of(unbounded)
    assert streamed == engine_tokens(engine, prompt, temperature=0.0)
    assert len(streamed) == 13 and unbounded.finish_reason == "length"
    with pytest.raises(ValueError, match="fills the context of 32"):
        scheduler.submit(random_prompt(tok, 32), SamplingParams())


# ---- threads --------------------------------------------------------------------------------------


def test_a_background_loop_serves_concurrent_clients(tok: Tokenizer, model: GPT) -> None:
    engine = Engine(model, tok)
    prompts = [random_prompt(tok, n, seed=n) for n in (2, 11, 27, 6)]
    results: dict[int, list[int]] = {}
    with BatchScheduler(model, tok, max_batch_size=2, prefill_chunk=8) as scheduler:
        scheduler.start()

        def client(i: int) -> None:
            handle = scheduler.submit(prompts[i], greedy(10))
            tokens = []
            while isinstance(event := handle.get(timeout=60), TokenEvent):
                tokens.append(event.token)
            results[i] = tokens

        clients = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=120)
        pending = scheduler.submit(prompts[0], greedy(None))
    assert results == {i: engine_tokens(engine, p, max_tokens=10, temperature=0.0) for i, p in enumerate(prompts)}
    list(pending)  # closing ended it: the stream terminates
    assert pending.finish_reason == "cancelled"
    with pytest.raises(SchedulerClosed):
        scheduler.submit(prompts[0], greedy(1))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_loop_ends_every_request_instead_of_hanging(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tok)

    def broken_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward", broken_forward)
    scheduler = BatchScheduler(model, tok)
    handle = scheduler.submit(random_prompt(tok, 3), greedy(4))
    scheduler.start()
    with pytest.raises(RequestFailed, match="device lost") as raised:
        list(handle)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert handle.finish_reason == "error"
    with pytest.raises(SchedulerClosed, match="device lost"):
        scheduler.submit(random_prompt(tok, 3), greedy(4))
    assert isinstance(scheduler.failure, RuntimeError)
    scheduler.close()  # joins the dead loop thread, so its traceback is reported within this test


def test_a_request_whose_sampling_fails_ends_alone(tok: Tokenizer, model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request's sampling error ends that request with "error"; its batch neighbours finish as
    usual and the scheduler keeps taking requests."""
    def failing_for_top_k_7(logits: torch.Tensor, generator: torch.Generator, temperature: float,
                            top_k: int | None, top_p: float | None = None) -> torch.Tensor:
        if top_k == 7:
            raise RuntimeError("invalid multinomial distribution")
        return batching_sample(logits, generator, temperature, top_k, top_p)

    batching_sample = batching.sample_next_token
    monkeypatch.setattr(batching, "sample_next_token", failing_for_top_k_7)
    scheduler = BatchScheduler(model, tok)
    prompt = random_prompt(tok, 5)
    healthy = scheduler.submit(prompt, greedy(6))
    failing = scheduler.submit(prompt, SamplingParams(max_tokens=6, top_k=7))
    run_until_idle(scheduler)
    assert failing.finish_reason == "error"
    with pytest.raises(RequestFailed, match="invalid multinomial") as raised:
        list(failing)
    assert isinstance(raised.value.__cause__, RuntimeError)
    healthy_tokens = tokens_of(healthy)
    assert len(healthy_tokens) == 6 and healthy.finish_reason == "length"
    assert scheduler.failure is None
    later = scheduler.submit(prompt, greedy(6))
    run_until_idle(scheduler)
    assert tokens_of(later) == healthy_tokens
    assert scheduler.load().free_slots == scheduler.max_batch_size


def test_get_times_out_and_repeats_the_end(tok: Tokenizer, model: GPT) -> None:
    scheduler = BatchScheduler(model, tok)
    handle = scheduler.submit(random_prompt(tok, 3), greedy(1))
    with pytest.raises(TimeoutError):
        handle.get(timeout=0.01)
    run_until_idle(scheduler)
    assert isinstance(handle.get(timeout=0), TokenEvent)
    assert handle.get(timeout=0) == handle.get(timeout=0) == Finished("length")


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=2.5), TypeError, "max_tokens"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=2.0), ValueError, "top_p"),
    (dict(seed=-1), ValueError, "64 bits"),
    (dict(stop_token_ids="ab"), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
])
def test_bad_sampling_params_fail_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_and_settings_fail_clearly(tok: Tokenizer, model: GPT) -> None:
    scheduler = BatchScheduler(model, tok)
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit([])
    with pytest.raises(ValueError, match=r"tokens\[1\]"):
        scheduler.submit([1, 10**6])
    with pytest.raises(ValueError, match="stop token id"):
        scheduler.submit([1], SamplingParams(stop_token_ids=[tok.vocab_size]))
    with pytest.raises(TypeError, match="SamplingParams"):
        scheduler.submit([1], {"temperature": 0.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        scheduler.submit_many([1], n=0)
    assert scheduler.load().waiting == 0
    for bad, match in ((dict(max_batch_size=0), "max_batch_size"), (dict(prefill_chunk=0), "prefill_chunk"),
                       (dict(max_queue=-1), "max_queue"), (dict(kv_token_budget=0), "kv_token_budget"),
                       (dict(max_seq_len=10**6), "rotary table")):
        with pytest.raises(ValueError, match=match):
            BatchScheduler(model, tok, **bad)  # type: ignore[arg-type]
