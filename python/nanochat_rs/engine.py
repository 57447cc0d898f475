"""Inference engine: KV-cached sampling of several completions of one prompt, with the calculator tool.

Protocol of `Engine.generate`:
  1. the prompt is prefilled once at batch 1 (one forward over all prompt tokens);
  2. that cache is replicated into a `num_samples`-row cache (KVCache.prefill), so N samples cost one
     prefill, not N;
  3. decoding then feeds one token per row per step; all rows advance in lockstep, which is what lets
     them share one cache position.

A row emitting <|python_start|> ... <|python_end|> has the text in between evaluated by the sandboxed
calculator; on success the engine queues <|output_start|> result <|output_end|> and feeds those
tokens to that row (mask 0: forced, not sampled) before sampling resumes for it.

A row stops at <|assistant_end|> or <|bos|>. It still occupies its slot in the batch until all rows
stop, and repeats its terminal token (mask 0) so callers can ignore it with one comparison.

`RowState` is that per-row tool/stop state machine; the continuous-batching scheduler
(`nanochat_rs.batching`) drives the same class, so both produce the same tokens for the same samples.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nanochat_rs.calculator import evaluate, format_result
from nanochat_rs.kv_cache import KVCache
from nanochat_rs.sampling import check_prompt, check_sampling_args, sample_next_token

if TYPE_CHECKING:
    from nanochat_rs.gpt import GPT
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["Engine", "KVCache", "RowState", "SpecialTokens", "sample_next_token"]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the special tokens generation reacts to."""

    stop: frozenset[int]
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialTokens:
        special = tokenizer.encode_special
        return cls(stop=frozenset({special("<|assistant_end|>"), tokenizer.bos_token_id}),
                   python_start=special("<|python_start|>"), python_end=special("<|python_end|>"),
                   output_start=special("<|output_start|>"), output_end=special("<|output_end|>"))


class RowState:
    """What one generated sequence holds at each step, given what was sampled for it.

    Priority: the repeated stop token once the row is done > queued tool output (forced) > the
    sample. Sampled tokens drive the state: a stop token ends the row, <|python_start|> ...
    <|python_end|> runs the calculator and queues its wrapped result. `extra_stop` adds stop ids to
    the tokenizer's own (<|assistant_end|>, <|bos|>).
    """

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens, extra_stop: frozenset[int] = frozenset()) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._stop = special.stop | extra_stop
        self._forced: deque[int] = deque()  # tool output still to be fed to this row
        self._python_tokens: list[int] | None = None  # tokens since <|python_start|>, None outside a tool call
        self.terminal: int | None = None  # the stop token once the row is done

    @property
    def done(self) -> bool:
        return self.terminal is not None

    def step(self, sampled: int) -> tuple[int, int]:
        """This step's `(token, mask)`: mask 1 = the sample was taken, 0 = forced or repeated stop."""
        if self.terminal is not None:
            return self.terminal, 0
        if self._forced:
            return self._forced.popleft(), 0
        self._observe(sampled)
        return sampled, 1

    def _observe(self, token: int) -> None:
        special = self._special
        if token in self._stop:
            self.terminal = token
        elif token == special.python_start:
            self._python_tokens = []
        elif token == special.python_end and self._python_tokens is not None:
            self._forced.extend(self._run_calculator(self._python_tokens))
            self._python_tokens = None
        elif self._python_tokens is not None:
            self._python_tokens.append(token)

    def _run_calculator(self, expression_tokens: list[int]) -> list[int]:
        """The tokens to force for a tool call: the wrapped result, or nothing if it was refused
        (the model then simply continues without an output block)."""
        result = evaluate(self._tokenizer.decode(expression_tokens))
        if result.value is None:
            return []
        special = self._special
        value_tokens = self._tokenizer.encode(format_result(result.value))
        return [special.output_start, *value_tokens, special.output_end]  # type: ignore[list-item]


class Engine:
    """Efficient sampling from a GPT: `generate` streams token columns, `generate_batch` collects."""

    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._special = SpecialTokens.of(tokenizer)

    # ---- public API -------------------------------------------------------------------------

    def generate(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 top_p: float | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield `(token_column, token_masks)` per step: one token per sample, mask 1 = sampled,
        0 = forced (tool output, or the repeated stop token of a finished row).

        Ends when every row has stopped, after `max_tokens` steps, or when the cache is full
        (`max_tokens=None` allows up to the model's sequence_len positions in total).
        """
        prompt = check_prompt(tokens, self.model.config.vocab_size)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        check_sampling_args(max_tokens, temperature, top_k, seed, max_tokens_optional=True, top_p=top_p)
        max_seq_len = self._cache_max_seq_len(len(prompt), max_tokens)
        return self._generate(prompt, num_samples, max_tokens, float(temperature), top_k, top_p, seed, max_seq_len)

    def generate_batch(self, tokens: Sequence[int], num_samples: int = 1,
                       **kwargs: Any) -> tuple[list[list[int]], list[list[int]]]:
        """Full sequences (prompt + generated, without the stop token) and their masks (0 over the
        prompt and over forced tool output)."""
        stream = self.generate(tokens, num_samples, **kwargs)  # validates before anything else
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, column_masks in stream:
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if finished[i]:
                    continue
                if token in self._special.stop:
                    finished[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    # ---- generation loop ----------------------------------------------------------------------

    def _generate(self, prompt: list[int], num_samples: int, max_tokens: int | None, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int,
                  max_seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
        if max_tokens == 0:
            return
        device = self.model.get_device()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        # inference_mode only around tensor work, never across a yield: the caller's code between
        # steps must run in whatever grad mode it chose.
        with torch.inference_mode():
            cache, logits = self._prefill(prompt, num_samples, max_seq_len, device)
        rows = [RowState(self.tokenizer, self._special) for _ in range(num_samples)]
        steps = 0
        while True:
            with torch.inference_mode():
                sampled_ids = sample_next_token(logits, generator, temperature, top_k, top_p)
            sampled = sampled_ids.tolist()  # the one device sync per step
            chosen = [row.step(token) for row, token in zip(rows, sampled, strict=True)]
            column = [token for token, _ in chosen]
            masks = [mask for _, mask in chosen]
            steps += 1
            yield column, masks
            if all(row.done for row in rows) or steps == max_tokens or cache.get_pos() >= max_seq_len:
                return
            with torch.inference_mode():
                # feed the sampled ids still on the device unless a row was overridden (forced tool
                # output or a repeated stop token): saves a host-to-device copy on most steps
                ids = sampled_ids if column == sampled else torch.tensor(column, dtype=torch.long, device=device)
                logits = self.model(ids.unsqueeze(1), kv_cache=cache, last_only=True)[:, -1, :]

    def _prefill(self, prompt: list[int], num_samples: int, max_seq_len: int,
                 device: torch.device) -> tuple[KVCache, torch.Tensor]:
        """Run the prompt once at batch 1 and return the cache to decode with plus next-token logits."""
        single = KVCache.for_model(self.model.config, 1, max_seq_len, device)
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=single, last_only=True)[:, -1, :]
        if num_samples == 1:
            return single, logits
        cache = KVCache.for_model(self.model.config, num_samples, max_seq_len, device)
        cache.prefill(single)
        return cache, logits.expand(num_samples, -1)

    # ---- validation -----------------------------------------------------------------------------

    def _cache_max_seq_len(self, prompt_len: int, max_tokens: int | None) -> int:
        """Positions to allocate: what `max_tokens` steps need (at most the rotary table, which the
        model over-allocates beyond sequence_len), else the model's trained context."""
        if max_tokens is None:
            limit, what = self.model.config.sequence_len, "the model's context (sequence_len)"
        else:
            limit, what = self.model.cos.size(1), "the model's rotary table"
        if prompt_len >= limit:
            raise ValueError(f"the prompt has {prompt_len} tokens, which fills {what} of {limit} positions: "
                             "shorten it" + (" or pass max_tokens explicitly" if max_tokens is None else ""))
        return limit if max_tokens is None else min(prompt_len + max_tokens, limit)
