"""Continuous batching: many generation requests share one running decode batch.

The scheduler keeps its sequences in a `PagedKVCache`, one slot per running request, each slot at its
own length. Every `step()`:
  1. retires cancelled requests, then admits waiting ones (first come, first served) while a slot and
     the KV pages for their whole reservation are free: requests join and leave at token boundaries;
  2. prefills at most `prefill_chunk` prompt tokens (one batch-1 forward per request still
     prefilling, oldest first), so a long prompt is spread over several steps instead of stalling
     everyone else's decode; a request whose prompt is complete samples its first token;
  3. decodes one token for every request past its prefill, all in one forward, each row at its own
     position; finished requests (stop token, max_tokens, context full) free their slot at once.

Sampling is per request: its own temperature / top-k / top-p and its own seeded torch.Generator,
drawn from once per step exactly as `Engine.generate` draws for a single sample. So a seed gives the
same tokens whatever else shares the batch, and the same tokens as the Engine (batched kernels round
differently, which can only matter for a draw landing on a probability boundary). Tool calls and stop
tokens go through `engine.RowState`, the Engine's own state machine.

Threads: `submit`, `submit_many`, `load`, `close` and everything on a `RequestHandle` may be called
from any thread. `step` must only ever be driven by one thread at a time: either call it yourself
or let `start()` run the loop in a background thread (what a server does).
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from nanochat_rs.engine import RowState, SpecialTokens
from nanochat_rs.kv_cache import PagedKVCache
from nanochat_rs.sampling import MAX_SEED, check_prompt, check_sampling_args, sample_next_token
from nanochat_rs.util import check_int

if TYPE_CHECKING:
    from nanochat_rs.gpt import GPT
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["BatchScheduler", "Event", "FinishReason", "Finished", "QueueFull", "RequestFailed", "RequestHandle",
           "SamplingParams", "SchedulerClosed", "SchedulerLoad", "TokenEvent"]

FinishReason = Literal["stop", "length", "cancelled", "error"]


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full: try again later (an HTTP server's 429)."""


class RequestFailed(RuntimeError):
    """Generating one request failed (the cause is chained); `BatchScheduler.failure` says whether the
    whole loop stopped with it."""


class SchedulerClosed(RuntimeError):
    """The scheduler takes no more requests: it was closed, or its loop failed (the cause is chained)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. `max_tokens=None` runs until a stop token or the context is full;
    `seed=None` draws a fresh random seed; `stop_token_ids` end the request like <|assistant_end|>."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 1)
        check_sampling_args(self.max_tokens, self.temperature, self.top_k, 0 if self.seed is None else self.seed,
                            max_tokens_optional=True, top_p=self.top_p)
        if isinstance(self.stop_token_ids, str | bytes) or not isinstance(self.stop_token_ids, Iterable):
            raise TypeError(f"stop_token_ids must be a collection of token ids, got {self.stop_token_ids!r}")
        stop = frozenset(self.stop_token_ids)
        for token in stop:
            check_int("each of stop_token_ids", token, 0)
        object.__setattr__(self, "stop_token_ids", stop)  # frozen: normalise any iterable once, here


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `forced`: calculator output the engine inserted (Engine's mask 0), not sampled."""

    token: int
    forced: bool


@dataclass(frozen=True)
class Finished:
    """The end of a request's stream. "stop": a stop token was sampled (it is not streamed);
    "length": max_tokens or the context ran out; "cancelled"; "error": sampling this request failed,
    or the whole loop did (`error`)."""

    reason: FinishReason
    error: BaseException | None = None


Event = TokenEvent | Finished


@dataclass(frozen=True)
class SchedulerLoad:
    """A consistent snapshot of what the scheduler holds (for metrics and health checks)."""

    running: int
    waiting: int
    free_slots: int
    free_kv_positions: int


class RequestHandle:
    """One request's stream of events, written by the scheduler thread and read by one consumer.

    `get(timeout)` returns the next event (a `Finished` ends the stream and is returned again on
    every later call); iterating yields the `TokenEvent`s and stops at the end, raising
    RequestFailed if generating it failed. `cancel()` (any thread) frees the request's slot at the
    scheduler's next step.
    """

    def __init__(self, request_id: int, on_event: Callable[[Event], None] | None,
                 wake_scheduler: Callable[[], None]) -> None:
        self.id = request_id
        self._on_event = on_event
        self._wake_scheduler = wake_scheduler
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancel_requested = threading.Event()
        self._finished: Finished | None = None  # set by the scheduler thread
        self._seen_end: Finished | None = None  # set by the consumer once it read the end

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the request ended, once the scheduler ended it (possibly before its events are read)."""
        return None if self._finished is None else self._finished.reason

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (e.g. the client went away). No effect once finished."""
        self._cancel_requested.set()
        self._wake_scheduler()

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most `timeout` seconds (None: as long as it takes)."""
        if self._seen_end is not None:
            return self._seen_end
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
        if isinstance(event, Finished):
            self._seen_end = event
        return event

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self.get()
            if isinstance(event, TokenEvent):
                yield event
                continue
            if event.reason == "error":
                raise RequestFailed(f"request {self.id} failed: {event.error!r}") from event.error
            return

    # ---- scheduler side ---------------------------------------------------------------------------

    def _push(self, event: Event) -> None:
        self._events.put(event)
        if self._on_event is not None:
            self._on_event(event)


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    positions: int  # KV positions reserved at admission: the most this request can ever feed
    row: RowState
    generator: torch.Generator
    slot: int | None = None  # None while waiting
    prefilled: int = 0  # prompt tokens already in the cache
    next_token: int | None = None  # emitted but not yet fed; None until the prompt is prefilled
    emitted: int = 0


class BatchScheduler:
    """Continuous batching over one model (see the module docstring for the step protocol).

    Caps: `max_batch_size` requests run at once; `kv_token_budget` KV positions are shared by them
    (default: enough for every slot to hold a full context), each request reserving
    min(prompt + max_tokens - 1, max_seq_len) positions at admission; `max_queue` more requests
    may wait, and `submit` beyond that raises QueueFull. `max_seq_len` (default the model's
    sequence_len) bounds prompt + generation, as the Engine's context does.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 256, kv_token_budget: int | None = None, page_size: int = 16,
                 max_seq_len: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = check_int("max_batch_size", max_batch_size, 1)
        self.max_queue = check_int("max_queue", max_queue, 0)
        self.prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
        rotary_positions = model.cos.size(1)
        self.max_seq_len = (model.config.sequence_len if max_seq_len is None
                            else check_int("max_seq_len", max_seq_len, 2))
        if self.max_seq_len > rotary_positions:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's rotary table of {rotary_positions}")
        page_size = check_int("page_size", page_size, 1)
        budget = (self.max_batch_size * self.max_seq_len if kv_token_budget is None
                  else check_int("kv_token_budget", kv_token_budget, 1))
        self._device = model.get_device()
        self._cache = PagedKVCache.for_model(model.config, num_slots=self.max_batch_size,
                                             num_pages=-(-budget // page_size), page_size=page_size,
                                             max_seq_len=self.max_seq_len, device=self._device)
        self._special = SpecialTokens.of(tokenizer)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # admitted (prefilling or decoding), oldest first
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- public API (any thread) -----------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue one request; its events stream through the returned handle.

        `on_event`, if given, is also called with every event, on the scheduler thread (e.g. to hand
        events to an asyncio loop with call_soon_threadsafe): it must be quick, must not raise and
        must not call close() (cancel() is fine).
        Raises ValueError/TypeError for a bad prompt or one that cannot fit, QueueFull when full,
        SchedulerClosed after close() or a failure.
        """
        return self.submit_many(prompt, params, 1, on_event=on_event)[0]

    def submit_many(self, prompt: Sequence[int], params: SamplingParams | None = None, n: int = 1, *,
                    on_event: Callable[[Event], None] | None = None) -> list[RequestHandle]:
        """Queue `n` samples of one prompt as `n` requests, all or none (QueueFull if they do not all
        fit). Sample i uses seed `params.seed + i` (each its own random seed if params.seed is None).
        Each sample prefills the prompt itself: prefixes are not shared between slots."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        check_int("n", n, 1)
        checked = self._check_prompt(prompt, params)
        requests = [self._new_request(checked, params, i, on_event) for i in range(n)]
        with self._lock:
            self._check_open()
            held = len(self._running) + len(self._waiting)
            capacity = self.max_batch_size + self.max_queue
            if held + n > capacity:
                raise QueueFull(f"the scheduler holds {held} requests and takes at most {capacity} "
                                f"({self.max_batch_size} running + {self.max_queue} waiting); {n} more do not fit")
            self._waiting.extend(requests)
            self._wake.notify()
        return [request.handle for request in requests]

    @property
    def failure(self) -> BaseException | None:
        """What stopped the scheduling loop, if it failed (it then takes no more requests)."""
        with self._lock:
            return self._failure

    def load(self) -> SchedulerLoad:
        with self._lock:
            return SchedulerLoad(running=len(self._running), waiting=len(self._waiting),
                                 free_slots=self._cache.free_slot_count(),
                                 free_kv_positions=self._cache.free_page_count() * self._cache.page_size)

    def start(self) -> None:
        """Run the scheduling loop in a background (daemon) thread until close()."""
        with self._lock:
            self._check_open()
            if self._thread is not None:
                raise RuntimeError("the scheduler loop is already running")
            self._thread = threading.Thread(target=self._loop, name="nanochat-batching", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, stop the loop thread (after its current step) and end every request
        still held with "cancelled"."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the scheduler loop did not stop within {timeout} s")
        self._end_all(Finished("cancelled"))

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the loop (one thread) ---------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduling round (retire cancelled, admit, prefill, decode). False if there was no work."""
        with self._lock:
            cancelled = [r for r in (*self._running, *self._waiting) if r.handle.cancel_requested]
        for request in cancelled:
            self._finish(request, Finished("cancelled"))
        with self._lock:
            self._admit()
            if not self._running:
                return False
        with torch.inference_mode():
            self._prefill()
            self._decode()
        return True

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._closed or self._running or self._waiting):
                        self._wake.wait()
                    if self._closed:
                        return
                self.step()
        except BaseException as error:
            with self._lock:
                self._closed = True
                self._failure = error
            self._end_all(Finished("error", error))
            raise  # the thread dies with its traceback printed: the failure is not silent

    def _wake_up(self) -> None:
        with self._lock:
            self._wake.notify()

    def _admit(self) -> None:
        """Called under the lock. First come, first served: a request that does not fit yet is not
        overtaken by smaller ones behind it, so it cannot starve."""
        while self._waiting and self._cache.can_allocate(self._waiting[0].positions):
            request = self._waiting.popleft()
            request.slot = self._cache.allocate(request.positions)
            self._running.append(request)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for request in [r for r in self._running if r.next_token is None]:
            if budget == 0:
                return
            chunk = request.prompt[request.prefilled:request.prefilled + budget]
            ids = torch.tensor([chunk], dtype=torch.long, device=self._device)
            logits = self.model(ids, kv_cache=self._cache.rows([request.slot]), last_only=True)[:, -1, :]
            request.prefilled += len(chunk)
            budget -= len(chunk)
            if request.prefilled == len(request.prompt):
                for sampled_request, sampled in self._sample([request], logits):
                    self._advance(sampled_request, sampled)

    def _decode(self) -> None:
        requests = [r for r in self._running if r.next_token is not None]
        if not requests:
            return
        ids = torch.tensor([[r.next_token] for r in requests], dtype=torch.long, device=self._device)
        rows = self._cache.rows([r.slot for r in requests])
        logits = self.model(ids, kv_cache=rows, last_only=True)[:, -1, :]
        for request, sampled in self._sample(requests, logits):
            self._advance(request, sampled)

    def _sample(self, requests: list[_Request], logits: torch.Tensor) -> list[tuple[_Request, int]]:
        """One draw per request from its own generator: what a request gets never depends on which
        other requests share the batch. A request whose own sampling fails ends with "error"
        alone; the rest of the batch goes on."""
        sampled: list[_Request] = []
        draws: list[torch.Tensor] = []
        for i, request in enumerate(requests):
            params = request.params
            try:
                draws.append(sample_next_token(logits[i:i + 1], request.generator, params.temperature, params.top_k,
                                               params.top_p))
            except Exception as error:  # noqa: BLE001 -- the error goes to that request's client
                self._finish(request, Finished("error", error))
                continue
            sampled.append(request)
        if not draws:
            return []
        return list(zip(sampled, torch.cat(draws).tolist(), strict=True))  # the one device sync for the batch

    def _advance(self, request: _Request, sampled: int) -> None:
        """Emit this step's token of a request (or end it) and queue the token to be fed next."""
        token, mask = request.row.step(sampled)
        if request.row.done:
            self._finish(request, Finished("stop"))
            return
        request.emitted += 1
        request.next_token = token
        request.handle._push(TokenEvent(token, forced=mask == 0))
        # the Engine's limits: max_tokens tokens, or the last one sampled from the last position
        if request.emitted == request.params.max_tokens or self._cache.length(request.slot) >= self.max_seq_len:
            self._finish(request, Finished("length"))

    def _finish(self, request: _Request, end: Finished) -> None:
        with self._lock:
            if request.handle._finished is not None:  # already ended (e.g. cancelled, then closed)
                return
            request.handle._finished = end
            if request.slot is None:
                self._waiting.remove(request)
            else:
                self._running.remove(request)
                self._cache.release(request.slot)
                request.slot = None
        request.handle._push(end)

    def _end_all(self, end: Finished) -> None:
        with self._lock:
            requests = [*self._running, *self._waiting]
        for request in requests:
            self._finish(request, end)

    # ---- validation --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._failure is not None:
            raise SchedulerClosed(f"the scheduler loop failed: {self._failure!r}") from self._failure
        if self._closed:
            raise SchedulerClosed("the scheduler is closed")

    def _check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        vocab_size = self.model.config.vocab_size
        tokens = check_prompt(prompt, vocab_size)
        if len(tokens) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens, which fills the context of {self.max_seq_len} "
                             "positions: shorten it")
        for token in params.stop_token_ids:
            if token >= vocab_size:
                raise ValueError(f"stop token id {token} is not a token id in [0, {vocab_size})")
        positions = self._positions(len(tokens), params.max_tokens)
        budget = self._cache.num_pages * self._cache.page_size
        if self._cache.pages_for(positions) > self._cache.num_pages:
            raise ValueError(f"the request needs {positions} KV positions (prompt + max_tokens) but the whole "
                             f"budget is {budget}: lower max_tokens or raise kv_token_budget")
        return tokens

    def _positions(self, prompt_len: int, max_tokens: int | None) -> int:
        # the last emitted token is never fed, hence the - 1
        return self.max_seq_len if max_tokens is None else min(prompt_len + max_tokens - 1, self.max_seq_len)

    def _new_request(self, prompt: list[int], params: SamplingParams, sample_index: int,
                     on_event: Callable[[Event], None] | None) -> _Request:
        seed = secrets.randbits(64) if params.seed is None else (params.seed + sample_index) % (MAX_SEED + 1)
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        handle = RequestHandle(next(self._ids), on_event, self._wake_up)
        return _Request(handle=handle, prompt=prompt, params=params,
                        positions=self._positions(len(prompt), params.max_tokens),
                        row=RowState(self.tokenizer, self._special, params.stop_token_ids), generator=generator)
