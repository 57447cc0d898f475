"""Serve a trained model over an OpenAI-compatible HTTP API: `nanochat-serve` (or `python -m nanochat_rs.serve`).

    nanochat-serve                                   # the newest chat model on http://127.0.0.1:8000
    nanochat-serve --source base --port 8080         # the newest base model (use /v1/completions)
    NANOCHAT_API_KEY=secret nanochat-serve --host 0.0.0.0

Endpoints: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models,
GET /health, and a chat page at /. Requests are batched continuously (nanochat_rs.batching).
fastapi and uvicorn (the `serve` extra) are imported only when the server starts, so `--help` is quick.
"""

from nanochat_rs.serve.cli import main

__all__ = ["main"]
