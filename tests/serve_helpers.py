"""A live server for the HTTP tests (imported by test modules; not a test file itself): the app over a
running scheduler, served in-process by uvicorn on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import uvicorn
from nanochat_rs.batching import BatchScheduler
from nanochat_rs.serve.app import create_app
from nanochat_rs.serve.cli import listen
from nanochat_rs.tokenizer import Tokenizer

KEY = "test-key"
MODEL = "tiny"
MAX_BODY = 4096


@dataclass
class Server:
    url: str
    scheduler: BatchScheduler
    tokenizer: Tokenizer

    def client(self, api_key: str = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def serve(scheduler: BatchScheduler, tokenizer: Tokenizer) -> Iterator[Server]:
    """Run the app on a free 127.0.0.1 port in a background thread until the caller is done."""
    app = create_app(tokenizer, scheduler, model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", scheduler, tokenizer)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        scheduler.close(timeout=30)
