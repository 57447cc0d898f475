"""The OpenAI-compatible HTTP app over a running `BatchScheduler` (see nanochat_rs.serve for the CLI).

Every request is submitted to the scheduler from the event loop; the scheduler thread only wakes the
loop (`on_event` -> call_soon_threadsafe), and the request's coroutine drains its handles itself, so
a slow client never holds up the batch. A request whose client goes away is cancelled, which frees
its slot at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from nanochat_rs.batching import Finished, QueueFull, SamplingParams, SchedulerClosed, TokenEvent
from nanochat_rs.conversation import readable_reply, render_for_completion
from nanochat_rs.sampling import SamplingArgError
from nanochat_rs.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from nanochat_rs.serve.text import ReplyText

if TYPE_CHECKING:
    from nanochat_rs.batching import BatchScheduler, RequestHandle
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
# How often a request waiting for tokens checks that its client is still there: a server behind no
# proxy learns of a disconnect only by asking.
DISCONNECT_POLL_S = 0.5
FinishReason = Literal["stop", "length"]  # what OpenAI's finish_reason can be here


def create_app(tokenizer: Tokenizer, scheduler: BatchScheduler, *, model_name: str, api_key: str | None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app serving `scheduler` (already started; the caller closes it) as model `model_name`.
    With an `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="nanochat_rs", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(error).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code,
                            headers=error.headers)  # e.g. a 405's Allow

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat_rs"}

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers probe with
    async def health() -> JSONResponse:
        report = {"status": "ok", "model": model_name, **asdict(scheduler.load())}
        if scheduler.failure is None:
            return JSONResponse(report)
        # a dead scheduler answers every request with an error: a load balancer must take it out
        return JSONResponse({**report, "status": "error", "error": _scheduler_failed(scheduler).message},
                            status_code=503)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("nanochat_rs").joinpath("static", "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        try:
            prompt = render_for_completion(tokenizer, [message.as_turn() for message in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        generation = _Generation.submit(scheduler, request, prompt, body, "messages",
                                        lambda tokens: readable_reply(tokenizer, tokens))
        reply = _ChatReply(generation, model_name)
        if body.stream:
            return _sse(reply.chunks(body.include_usage))
        return JSONResponse(await reply.whole())

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        try:
            prompt = [tokenizer.bos_token_id, *tokenizer.encode(body.prompt)]
        except ValueError as e:  # text that is not valid Unicode
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        generation = _Generation.submit(scheduler, request, prompt, body, "prompt", tokenizer.decode)
        reply = _TextReply(generation, model_name)
        if body.stream:
            return _sse(reply.chunks(body.include_usage))
        return JSONResponse(await reply.whole())

    return app


class _Gate:
    """Checks the API key of /v1 requests, then reads the body (at most `max_body_bytes`, whatever
    Content-Length claims) before anything parses it; the app gets the body replayed."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/") and not self._authorised(headers):
            await _reject(APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key"), scope, receive, send)
            return
        too_big = APIError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            await _reject(APIError(400, "Content-Length is not a number"), scope, receive, send)
            return
        if int(declared) > self.max_body_bytes:
            await _reject(too_big, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await _reject(too_big, scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return dict(await receive())  # later calls wait for the disconnect, as the server's receive does
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        assert self.api_key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


async def _reject(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def _validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first bad field."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(location) or "the request body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=location[0] if location else None)


class _Generation:
    """The n samples of one request, in flight in the scheduler, read as text updates."""

    def __init__(self, request: Request, prompt: list[int], handles: list[RequestHandle], wake: asyncio.Event,
                 render: Callable[[Sequence[int]], str], stops: list[str]) -> None:
        self.request = request
        self.prompt = prompt
        self.handles = handles
        self.replies = [ReplyText(render, stops) for _ in handles]
        self.finish_reasons: list[FinishReason | None] = [None] * len(handles)
        self._wake = wake
        self._next_disconnect_check = time.monotonic() + DISCONNECT_POLL_S

    @classmethod
    def submit(cls, scheduler: BatchScheduler, request: Request, prompt: list[int],
               body: ChatCompletionRequest | CompletionRequest, prompt_param: str,
               render: Callable[[Sequence[int]], str]) -> _Generation:
        params = _sampling_params(scheduler, prompt, body, prompt_param)
        capacity = scheduler.max_batch_size + scheduler.max_queue
        if body.n > capacity:
            raise APIError(400, f"n must be at most {capacity} (what this server holds at once), got {body.n}",
                           param="n")
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_event(_: object) -> None:  # on the scheduler thread: must not raise
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the event loop is closed (server shut down): nobody waits for this any more
                pass

        try:
            handles = scheduler.submit_many(prompt, params, body.n, on_event=on_event)
        except QueueFull:
            raise APIError(429, "the server is busy: every slot and queue place is taken; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded") from None
        except SchedulerClosed:
            if scheduler.failure is not None:
                raise _scheduler_failed(scheduler) from None
            raise APIError(503, "the server is shutting down", type="server_error") from None
        except ValueError as e:  # e.g. the request's KV reservation exceeds the whole budget
            raise APIError(400, str(e), param=body.token_limit_param) from None
        return cls(request, prompt, handles, wake, render, body.stop_strings)  # ReplyText drops empty stops

    @property
    def completion_tokens(self) -> int:
        return sum(len(reply.tokens) for reply in self.replies)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt) + self.completion_tokens}

    async def updates(self) -> AsyncIterator[tuple[int, str, FinishReason | None]]:
        """(choice, new text, finish reason or None) as tokens arrive; ends when every choice has
        finished or the client went away. Whatever ends it cancels what is still running."""
        try:
            while None in self.finish_reasons:
                self._wake.clear()  # before draining: a token arriving meanwhile sets it again
                for index in range(len(self.handles)):
                    for update in self._drain(index):
                        yield update
                if None in self.finish_reasons and not await self._wait():
                    return
        finally:
            for handle in self.handles:
                handle.cancel()  # no effect on a finished request

    async def _wait(self) -> bool:
        """Wait for the scheduler's next event; False if the client disconnected. The client is asked
        every DISCONNECT_POLL_S whether or not tokens arrive meanwhile: a fast model must not keep
        generating for a client that left."""
        while True:
            remaining = self._next_disconnect_check - time.monotonic()
            if remaining <= 0:
                if await self.request.is_disconnected():
                    return False
                self._next_disconnect_check = time.monotonic() + DISCONNECT_POLL_S
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
                return True
            except TimeoutError:
                pass

    def _drain(self, index: int) -> list[tuple[int, str, FinishReason | None]]:
        handle, reply = self.handles[index], self.replies[index]
        updates: list[tuple[int, str, FinishReason | None]] = []
        while self.finish_reasons[index] is None:
            try:
                event = handle.get(timeout=0)
            except TimeoutError:
                break
            if isinstance(event, TokenEvent):
                text = reply.add(event.token)
                if reply.stopped:  # a stop string: the reply ends here, its slot is freed at the next step
                    handle.cancel()
                    self.finish_reasons[index] = "stop"
                    updates.append((index, text, "stop"))
                elif text:
                    updates.append((index, text, None))
            else:
                reason = _finish_reason(event)
                self.finish_reasons[index] = "stop" if reply.stopped else reason
                updates.append((index, reply.finish(), self.finish_reasons[index]))
        return updates


def _finish_reason(end: Finished) -> FinishReason:
    if end.reason in ("stop", "length"):
        return end.reason
    if end.reason == "cancelled":  # only the scheduler closing cancels a request this server did not
        raise APIError(503, "the server is shutting down", type="server_error")
    raise APIError(500, f"generating this reply failed: {end.error!r}", type="server_error")


def _scheduler_failed(scheduler: BatchScheduler) -> APIError:
    return APIError(503, f"the model's scheduler failed ({scheduler.failure!r}) and takes no more requests; "
                         "restart the server", type="server_error")


def _sampling_params(scheduler: BatchScheduler, prompt: list[int], body: ChatCompletionRequest | CompletionRequest,
                     prompt_param: str) -> SamplingParams:
    context = scheduler.max_seq_len
    if len(prompt) >= context:
        raise APIError(400, f"the prompt is {len(prompt)} tokens but the model's context is {context} tokens, "
                            "which must also hold the reply: shorten it", param=prompt_param,
                       code="context_length_exceeded")
    room = context - len(prompt)
    max_tokens = room if body.token_limit is None else body.token_limit
    if not 1 <= max_tokens <= room:
        name = body.token_limit_param
        raise APIError(400, f"{name} must be between 1 and {room} (the model's context of {context} tokens "
                            f"minus the prompt's {len(prompt)}), got {max_tokens}", param=name)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed)
    except SamplingArgError as e:
        raise APIError(400, str(e), param=e.name) from None


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except APIError as error:  # the status line is sent already: the error goes in the stream
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _ChatReply:
    """A generation in the shapes of /v1/chat/completions."""

    def __init__(self, generation: _Generation, model_name: str) -> None:
        self.generation = generation
        self.base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_name}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.base, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices}

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        for index in range(len(self.generation.handles)):
            yield self._chunk([_delta(index, {"role": "assistant", "content": ""}, None)])
        async for index, text, finish in self.generation.updates():
            if text:
                yield self._chunk([_delta(index, {"content": text}, None)])
            if finish is not None:
                yield self._chunk([_delta(index, {}, finish)])
        if include_usage:
            yield {**self._chunk([]), "usage": self.generation.usage()}

    async def whole(self) -> dict[str, Any]:
        async for _ in self.generation.updates():
            pass
        generation = self.generation
        choices = [{"index": i, "message": {"role": "assistant", "content": reply.text}, "logprobs": None,
                    "finish_reason": generation.finish_reasons[i]} for i, reply in enumerate(generation.replies)]
        return {**self.base, "object": "chat.completion", "system_fingerprint": None, "choices": choices,
                "usage": generation.usage()}


def _delta(index: int, delta: dict[str, Any], finish: FinishReason | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


class _TextReply:
    """A generation in the shapes of /v1/completions."""

    def __init__(self, generation: _Generation, model_name: str) -> None:
        self.generation = generation
        self.base = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                     "model": model_name}

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        async for index, text, finish in self.generation.updates():
            yield {**self.base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            yield {**self.base, "choices": [], "usage": self.generation.usage()}

    async def whole(self) -> dict[str, Any]:
        async for _ in self.generation.updates():
            pass
        generation = self.generation
        choices = [{"index": i, "text": reply.text, "logprobs": None, "finish_reason": generation.finish_reasons[i]}
                   for i, reply in enumerate(generation.replies)]
        return {**self.base, "choices": choices, "usage": generation.usage()}
