"""The HTTP server under N concurrent streaming clients: continuous batching vs one request at a time.

    OMP_NUM_THREADS=1 python scripts/bench_serve.py                       # small random-init model, CPU
    python scripts/bench_serve.py --clients 1,4,16,64 --max-tokens 64 --depth 4
    python scripts/bench_serve.py --checkpoint DIR --device-type cuda

Two servers run the same model in subprocesses on loopback ports: one batching up to the largest
client count, one with --max-batch-size 1 (a server without batching). For each client count, that
many streaming /v1/chat/completions requests start at once (temperature 1, so a random model rarely
stops early). Reported per server: aggregate generated tokens/s (usage.completion_tokens over the
round's wall time), time to first token and inter-token latency (gap between content chunks) p50/p99,
and the throughput ratio batched / one-at-a-time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_batching import load_or_build

MODEL = "bench"


@dataclass(frozen=True)
class Round:
    tokens: int
    seconds: float
    ttft_s: list[float]
    itl_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="benchmark this model (default: random init)")
    parser.add_argument("--depth", type=int, default=4, help="random-init model depth (model_dim = 64 * depth)")
    parser.add_argument("--sequence-len", type=int, default=512, help="random-init model's context length")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrent client counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request (at most)")
    parser.add_argument("--device-type", default="cpu", choices=["cuda", "cpu", "mps"])
    args = parser.parse_args()
    try:
        args.clients = [int(n) for n in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients must be comma-separated counts, got {args.clients!r}")
    if min(args.clients) < 1 or args.max_tokens < 1:
        parser.error("--clients and --max-tokens must be >= 1")
    return args


def serve(args: argparse.Namespace, port: int, max_batch_size: int, max_queue: int) -> None:
    """The server process: the same model, batching up to `max_batch_size` requests."""
    import torch
    import uvicorn
    from nanochat_rs.batching import BatchScheduler
    from nanochat_rs.serve.app import create_app

    model, tokenizer = load_or_build(args, torch.device(args.device_type))
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    scheduler.start()
    uvicorn.run(create_app(tokenizer, scheduler, model_name=MODEL, api_key=None), host="127.0.0.1", port=port,
                log_level="warning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: multiprocessing.Process) -> None:
    for _ in range(1200):
        if not process.is_alive():
            raise SystemExit(f"the server behind {url} died while starting")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server behind {url} did not come up within 120 s")


async def one_client(client: httpx.AsyncClient, url: str, index: int,
                     max_tokens: int) -> tuple[int, float, list[float]]:
    """(completion tokens, time to first token, gaps between content chunks) of one streaming request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a story, number {index}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    if not arrivals:
        return tokens, time.perf_counter() - start, []
    return tokens, arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


async def run_round(url: str, clients: int, max_tokens: int) -> Round:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, i, max_tokens) for i in range(clients)))
        seconds = time.perf_counter() - start
    return Round(sum(r[0] for r in results), seconds, [r[1] for r in results], [g for r in results for g in r[2]])


def report(name: str, clients: int, result: Round) -> str:
    ms = 1e3
    return (f"{clients:7d} {name:>14} {result.tokens:7d} {result.seconds:8.2f} {result.tokens_per_s:9.1f} "
            f"{ms * percentile(result.ttft_s, 50):9.0f} {ms * percentile(result.ttft_s, 99):9.0f} "
            f"{ms * percentile(result.itl_s, 50):8.1f} {ms * percentile(result.itl_s, 99):8.1f}")


def main() -> None:
    args = parse_args()
    most = max(args.clients)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state shared with this one
    servers = {}
    for name, batch in (("batched", most), ("one-at-a-time", 1)):
        port = free_port()
        process = context.Process(target=serve, args=(args, port, batch, most), daemon=True)
        process.start()
        servers[name] = (f"http://127.0.0.1:{port}", process)
    try:
        for url, process in servers.values():
            wait_until_up(url, process)
            asyncio.run(run_round(url, 1, args.max_tokens))  # warm-up: first-call costs are not serving costs
        print(f"model: {'random init, depth ' + str(args.depth) if args.checkpoint is None else args.checkpoint} on "
              f"{args.device_type}; up to {args.max_tokens} tokens per request; batched server: batch {most}")
        print(f"{'clients':>7} {'server':>14} {'tokens':>7} {'wall s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}   (ms)")
        for clients in args.clients:
            rounds = {name: asyncio.run(run_round(url, clients, args.max_tokens))
                      for name, (url, _) in servers.items()}
            for name, result in rounds.items():
                print(report(name, clients, result), flush=True)
            ratio = rounds["batched"].tokens_per_s / rounds["one-at-a-time"].tokens_per_s
            print(f"{clients:7d} {'ratio':>14} {ratio:.2f}x aggregate tokens/s, batched / one at a time", flush=True)
    finally:
        for _, process in servers.values():
            process.terminate()
            process.join(10)


if __name__ == "__main__":
    main()
