"""Inference speed: KV-cached Engine vs naive full-recompute generation.

    python scripts/bench_inference.py                          # small random-init model, autodetected device
    python scripts/bench_inference.py --depth 12 --sequence-len 2048 --prompt-len 512 --max-tokens 256
    python scripts/bench_inference.py --checkpoint DIR         # a trained model instead

Reports, per batch size: prefill tokens/s (one batch-1 forward over the prompt into a KV cache), time
to first token and decode tokens/s of Engine.generate (N samples of one prompt), and the same for the
naive GPT.generate baseline (batch 1, recomputes the whole sequence for every token), with ratios.
Random init is fine: speed does not depend on the weights.

Batch-1 decode is bound by memory bandwidth, so it is also reported as GB/s: the bytes every step must
read (each non-embedding weight once, plus the attended keys/values) times steps per second. With
--peak-gbs (e.g. 3350 for an H100 SXM) that becomes memory-bandwidth utilisation (MBU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from nanochat_rs.common import COMPUTE_DTYPE, autodetect_device_type, compute_cleanup, compute_init
from nanochat_rs.engine import Engine, KVCache

if TYPE_CHECKING:
    from nanochat_rs.gpt import GPT
    from nanochat_rs.tokenizer import Tokenizer


@dataclass(frozen=True)
class Timing:
    ttft_s: float  # call -> first token available on the host
    decode_tokens: int  # tokens produced after the first step, summed over samples
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="benchmark this model (default: random init)")
    parser.add_argument("--depth", type=int, default=4, help="random-init model depth (model_dim = 64 * depth)")
    parser.add_argument("--sequence-len", type=int, default=512, help="random-init model's context length")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sample")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated num_samples to measure")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the device's peak memory bandwidth in GB/s, to report MBU at batch 1")
    args = parser.parse_args()
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated ints, got {args.batch_sizes!r}")
    if args.prompt_len < 1 or args.max_tokens < 2 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--prompt-len, --repeats and batch sizes must be >= 1 and --max-tokens >= 2")
    if args.peak_gbs is not None and not args.peak_gbs > 0:
        parser.error(f"--peak-gbs must be positive, got {args.peak_gbs}")
    return args


def load_or_build(args: argparse.Namespace, device: torch.device) -> tuple[GPT, Tokenizer]:
    if args.checkpoint is not None:
        from nanochat_rs.checkpoint import load_model

        model, tokenizer, _ = load_model(args.checkpoint, device)
        return model, tokenizer
    from nanochat_rs.gpt import build_model, config_for_depth
    from nanochat_rs.tok_train import load_or_train_tokenizer

    tokenizer = load_or_train_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.sequence_len)
    return build_model(config, device).eval(), tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def random_prompt(vocab_size: int, bos: int, length: int) -> list[int]:
    """BOS + ordinary tokens (the special tokens sit at the top of the vocabulary)."""
    generator = torch.Generator().manual_seed(0)
    body = torch.randint(0, vocab_size - 16, (length - 1,), generator=generator).tolist()
    return [bos, *body]


def bytes_per_decode_step(model: GPT, position: int) -> int:
    """A lower bound on the memory one batch-1 decode step at `position` reads: every weight once,
    except embedding tables (one row gathered), plus each layer's keys and values inside its window."""
    gathered = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)
    config = model.config
    kv_row = 2 * config.n_kv_head * config.head_dim * torch.finfo(COMPUTE_DTYPE).bits // 8
    keys = sum(min(window, position) + 1 for window in model.window_sizes)  # window = keys back from here
    return weights + keys * kv_row


def time_prefill(model: GPT, prompt: list[int], device: torch.device) -> float:
    cache = KVCache.for_model(model.config, 1, len(prompt), device)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, kv_cache=cache, last_only=True)  # what Engine does: only the last logits are sampled
    sync(device)
    return time.perf_counter() - start


def time_stream(stream: Iterable[object], tokens_per_step: int) -> Timing:
    """Drain a token iterator; every item is already on the host, so no extra sync is needed."""
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in stream:
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the generator produced no tokens")
    return Timing(first - start, (steps - 1) * tokens_per_step, end - first)


def best(timings: list[Timing]) -> Timing:
    """Best TTFT and best decode rate over repeats (each is noisy on its own)."""
    fastest = max(timings, key=lambda t: t.decode_tok_s)
    return Timing(min(t.ttft_s for t in timings), fastest.decode_tokens, fastest.decode_s)


def main() -> None:
    args = parse_args()
    _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer = load_or_build(args, device)
    config = model.config
    prompt = random_prompt(config.vocab_size, tokenizer.bos_token_id, args.prompt_len)
    engine = Engine(model, tokenizer)
    print(f"device {device}, model: n_layer={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} "
          f"sequence_len={config.sequence_len} vocab={config.vocab_size}; prompt {len(prompt)} tokens, "
          f"{args.max_tokens} generated per sample, best of {args.repeats}")

    def engine_run(batch: int, seed: int) -> Timing:
        # temperature 1: rows differ and a random model essentially never samples a stop token
        stream = engine.generate(prompt, num_samples=batch, max_tokens=args.max_tokens, temperature=1.0,
                                 seed=seed)
        return time_stream(stream, batch)

    def naive_run(seed: int) -> Timing:
        return time_stream(model.generate(prompt, args.max_tokens, temperature=1.0, seed=seed), 1)

    engine_run(1, 0)  # warm-up: kernels, allocator, caches
    prefill_s = min(time_prefill(model, prompt, device) for _ in range(args.repeats))
    naive = best([naive_run(r) for r in range(args.repeats)])
    results = {b: best([engine_run(b, r) for r in range(args.repeats)]) for b in args.batch_sizes}

    print(f"\nprefill (batch 1, KV cache): {len(prompt) / prefill_s:,.0f} tok/s ({prefill_s * 1e3:.1f} ms)")
    print(f"{'':>16} {'TTFT ms':>9} {'decode tok/s':>13} {'vs naive':>9} {'vs engine b1':>13}")
    print(f"{'naive b1':>16} {naive.ttft_s * 1e3:9.1f} {naive.decode_tok_s:13,.1f} {1.0:9.2f}x {'':>13}")
    base = results.get(1)
    for b, t in results.items():
        vs_b1 = f"{t.decode_tok_s / base.decode_tok_s:12.2f}x" if base else ""
        print(f"{f'engine b{b}':>16} {t.ttft_s * 1e3:9.1f} {t.decode_tok_s:13,.1f} "
              f"{t.decode_tok_s / naive.decode_tok_s:8.2f}x {vs_b1:>13}")
    if base:
        # the average decode step sits halfway through the generated tokens
        step_bytes = bytes_per_decode_step(model, len(prompt) + args.max_tokens // 2)
        gbs = step_bytes * base.decode_tok_s / 1e9
        mbu = f", MBU {gbs / args.peak_gbs:.1%} of {args.peak_gbs:,.0f} GB/s" if args.peak_gbs else ""
        print(f"\nbatch-1 decode reads >= {step_bytes / 1e6:,.1f} MB per step: {gbs:,.1f} GB/s{mbu}")
    compute_cleanup()


if __name__ == "__main__":
    main()
