"""Continuous batching vs one request at a time: aggregate generation throughput and time to first token.

    python scripts/bench_batching.py                                  # small random-init model, autodetected device
    python scripts/bench_batching.py --requests 32 --max-batch-size 16 --prompt-lens 16,512 --max-tokens 128
    python scripts/bench_batching.py --checkpoint DIR                 # a trained model instead

N requests with prompts of varied lengths are all submitted at once to a BatchScheduler (which admits up
to --max-batch-size of them, prefills in chunks and decodes them together), and are also run one after
the other through Engine.generate (one sample each), the way a server without batching would serve them.
Both sample with the same seeds (temperature 1, so a random model rarely stops early). Reported: tokens
generated, aggregate tokens/s, mean and worst time to first token counted from the moment all requests
arrive, and the throughput ratio. Random init is fine: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_inference import load_or_build  # this directory: the bench's model, built the same way
from nanochat_rs.batching import BatchScheduler, Event, SamplingParams, TokenEvent
from nanochat_rs.common import autodetect_device_type, compute_cleanup, compute_init
from nanochat_rs.engine import Engine, SpecialTokens


@dataclass(frozen=True)
class Result:
    tokens: int
    seconds: float
    first_token_s: list[float]  # per request, from the moment all requests arrived

    def report(self, name: str) -> str:
        ttft = sorted(self.first_token_s)
        return (f"{name:>12} {self.tokens:8d} {self.seconds:9.2f} {self.tokens / self.seconds:11,.1f} "
                f"{1e3 * sum(ttft) / len(ttft):12.1f} {1e3 * ttft[-1]:12.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="benchmark this model (default: random init)")
    parser.add_argument("--depth", type=int, default=4, help="random-init model depth (model_dim = 64 * depth)")
    parser.add_argument("--sequence-len", type=int, default=512, help="random-init model's context length")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--prompt-lens", default="8,256", help="MIN,MAX: prompt lengths spread evenly between")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (at most)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the scheduler's concurrent sequences")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the scheduler's prompt tokens per step")
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    args = parser.parse_args()
    try:
        low, high = (int(n) for n in args.prompt_lens.split(","))
    except ValueError:
        parser.error(f"--prompt-lens must be MIN,MAX, got {args.prompt_lens!r}")
    if not 1 <= low <= high:
        parser.error(f"--prompt-lens needs 1 <= MIN <= MAX, got {args.prompt_lens!r}")
    args.prompt_lens = (low, high)
    for name in ("requests", "max_tokens", "max_batch_size", "prefill_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_prompts(count: int, lengths: tuple[int, int], vocab_size: int, bos: int) -> list[list[int]]:
    """BOS + ordinary tokens (the special tokens sit at the top of the vocabulary), lengths spread evenly."""
    generator = torch.Generator().manual_seed(0)
    low, high = lengths
    sizes = [low + (high - low) * i // max(count - 1, 1) for i in range(count)]
    return [[bos, *torch.randint(0, vocab_size - 16, (n - 1,), generator=generator).tolist()] for n in sizes]


def sequential(engine: Engine, prompts: list[list[int]], max_tokens: int) -> Result:
    stop = SpecialTokens.of(engine.tokenizer).stop  # not counted: the scheduler does not stream stop tokens
    start = time.perf_counter()
    tokens, first = 0, []
    for seed, prompt in enumerate(prompts):
        for step, (column, _) in enumerate(engine.generate(prompt, max_tokens=max_tokens, temperature=1.0,
                                                           seed=seed)):
            if step == 0:
                first.append(time.perf_counter() - start)
            if column[0] in stop:
                break
            tokens += 1
    return Result(tokens, time.perf_counter() - start, first)


def batched(scheduler: BatchScheduler, prompts: list[list[int]], max_tokens: int) -> Result:
    start = time.perf_counter()
    first: dict[int, float] = {}
    counts = [0] * len(prompts)

    def recorder(index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, TokenEvent):
                first.setdefault(index, time.perf_counter() - start)
                counts[index] += 1
        return on_event

    for seed, prompt in enumerate(prompts):
        scheduler.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed),
                         on_event=recorder(seed))
    while scheduler.step():
        pass
    return Result(sum(counts), time.perf_counter() - start, list(first.values()))


def main() -> None:
    args = parse_args()
    _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer = load_or_build(args, device)
    config = model.config
    prompts = make_prompts(args.requests, args.prompt_lens, config.vocab_size, tokenizer.bos_token_id)
    engine = Engine(model, tokenizer)
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.requests,
                               prefill_chunk=args.prefill_chunk)
    print(f"device {device}, model: n_layer={config.n_layer} n_embd={config.n_embd} sequence_len="
          f"{config.sequence_len}; {args.requests} requests, prompts {args.prompt_lens[0]}-{args.prompt_lens[1]} "
          f"tokens, up to {args.max_tokens} generated each; scheduler: batch {args.max_batch_size}, "
          f"prefill chunk {args.prefill_chunk}")
    batched(scheduler, prompts[:2], 4)  # warm-up: kernels, allocator
    one_at_a_time = sequential(engine, prompts, args.max_tokens)
    continuous = batched(scheduler, prompts, args.max_tokens)
    print(f"\n{'':>12} {'tokens':>8} {'seconds':>9} {'tok/s':>11} {'mean TTFT ms':>12} {'max TTFT ms':>12}")
    print(one_at_a_time.report("sequential"))
    print(continuous.report("batched"))
    ratio = (continuous.tokens / continuous.seconds) / (one_at_a_time.tokens / one_at_a_time.seconds)
    print(f"\naggregate throughput, batched / sequential: {ratio:.2f}x")
    compute_cleanup()


if __name__ == "__main__":
    main()
