"""Attention backends side by side: FA3 vs FlexAttention vs SDPA (with an explicit window mask), on
the same sliding-window (and full causal) training attention, forward + backward.

    python scripts/bench_attention.py                          # d12 shapes on CUDA
    python scripts/bench_attention.py --device-type cpu -B 1 -T 256 --heads 2

Prints ms per fwd+bwd for each backend available here and its speed relative to masked SDPA (the
portable fallback). FA3 needs `flash_attn_interface` on a Hopper GPU; Flex needs CUDA.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from nanochat_rs import attention
from nanochat_rs.common import COMPUTE_DTYPE, autodetect_device_type

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def backends(device: torch.device, dtype: torch.dtype, T: int, left: int) -> dict[str, Attn]:
    positions = torch.arange(T, device=device)
    mask = attention._visibility(positions, positions, left, 0)
    found: dict[str, Attn] = {"sdpa+mask": lambda q, k, v: attention._sdpa(q, k, v, mask=mask)}
    if left >= T - 1:
        found["sdpa causal"] = lambda q, k, v: attention._sdpa(q, k, v, is_causal=True)
    if device.type == "cuda":
        found["flex"] = lambda q, k, v: attention._flex(q, k, v, left, 0)
    if attention._use_fa3(device, dtype):
        fa3 = attention._FA3

        def run_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = fa3.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
            return out[0] if isinstance(out, tuple) else out

        found["fa3"] = run_fa3
    return found


def time_fwd_bwd(fn: Attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, iters: int) -> float:
    def once() -> None:
        out = fn(q, k, v)
        out.float().square().mean().backward()
        q.grad = k.grad = v.grad = None

    for _ in range(3):  # warm-up (compilation for flex)
        once()
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    start = time.perf_counter()
    for _ in range(iters):
        once()
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"])
    parser.add_argument("-B", type=int, default=32)
    parser.add_argument("-T", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())
    dtype = COMPUTE_DTYPE if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.B, args.T, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    short = min(math.ceil(args.T / 4 / 128) * 128, args.T)  # the model's 'S' window
    print(f"device {device.type} | dtype {dtype} | B {args.B} T {args.T} heads {args.heads} head_dim {args.head_dim}")
    for label, left in (("sliding window " + str(short), short), ("full causal", args.T - 1)):
        results = {name: time_fwd_bwd(fn, q, k, v, args.iters)
                   for name, fn in backends(device, dtype, args.T, left).items()}
        base = results["sdpa+mask"]
        print(f"== {label} ==")
        for name, seconds in results.items():
            print(f"  {name:12s} {seconds * 1000:9.2f} ms   x{base / seconds:5.2f} vs sdpa+mask")


if __name__ == "__main__":
    main()
