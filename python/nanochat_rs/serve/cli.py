"""`nanochat-serve`: load a checkpoint and serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

from nanochat_rs import cli
from nanochat_rs.chat import add_checkpoint_args, default_checkpoint_dir

__all__ = ["API_KEY_ENV", "listen", "main", "parse_args", "run"]

API_KEY_ENV = "NANOCHAT_API_KEY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nanochat-serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    add_checkpoint_args(parser, "chat: the newest run under $NANOCHAT_BASE_DIR/chat_checkpoints (the base model "
                                "when there is none yet); base: the newest under base_checkpoints")
    parser.add_argument("--model-name", default=None, help="the model id clients ask for (default: the "
                                                           "checkpoint directory's name, e.g. d20)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV})")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (more: HTTP 429)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (more: HTTP 413)")
    cli.add_device_arg(parser)
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Reject impossible values before the (slow) model load."""
    for name in ("max_batch_size", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise cli.UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise cli.UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key == "":
        raise cli.UsageError("--api-key is empty: give a key, or leave it out to serve without one")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), taken before the model loads: a busy port or a bad address then
    fails in one line at once, not after a minute of loading, and port 0 names the port it got."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot serve on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: ": is another server running? pick another --port",
                errno.EACCES: ": ports below 1024 need root; pick another --port"}.get(e.errno or 0, "")
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def run(args: argparse.Namespace) -> None:
    check_options(args)
    try:
        import uvicorn

        from nanochat_rs.serve.app import create_app
    except ImportError as e:
        raise cli.UsageError(f"serving needs fastapi and uvicorn ({e}): pip install 'nanochat_rs[serve]'") from None
    from nanochat_rs.batching import BatchScheduler
    from nanochat_rs.checkpoint import load_model
    from nanochat_rs.common import autodetect_device_type, base_dir, compute_cleanup, compute_init

    if args.api_key is None and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              f"model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    with listen(args.host, args.port) as sock:
        _, device = compute_init(args.device_type or autodetect_device_type())
        try:
            checkpoint = args.checkpoint or default_checkpoint_dir(base_dir(), args.source)
            model, tokenizer, _ = load_model(checkpoint, device, step=args.step)
            model_name = args.model_name or Path(checkpoint).resolve().name
            scheduler = BatchScheduler(model, tokenizer, max_batch_size=args.max_batch_size,
                                       max_queue=args.max_queue)
            scheduler.start()
            try:
                app = create_app(tokenizer, scheduler, model_name=model_name, api_key=args.api_key,
                                 max_body_bytes=args.max_body_bytes)
                host, port = sock.getsockname()[:2]
                url_host = f"[{host}]" if ":" in host else host
                print(f"serving {model_name} on http://{url_host}:{port} (chat page at /, API at /v1; "
                      "Ctrl-C to stop)", flush=True)
                uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
            finally:
                scheduler.close()
        finally:
            compute_cleanup(wait_for_peers=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_job(lambda: run(args))
