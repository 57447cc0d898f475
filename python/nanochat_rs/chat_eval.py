"""Accuracy of a chat model on tasks, and ChatCORE over them (nanochat's chat_eval).

Two kinds of task (a task's `eval_type`):

- categorical (ARC-Easy, ARC-Challenge, MMLU): no sampling. Each prompt (the question rendered up to
  <|assistant_start|>) is run once, several prompts per forward, right-padded; the logits at each row's
  last real position, restricted to the answer letters the question offers, pick the answer, and the
  task's `evaluate` checks it. Guessing scores 1/(letters offered) on average: that is the task's chance.
- generative (GSM8K, HumanEval and the embedded tasks): replies sampled with the calculator on (the
  Engine's generation, batched by `batching.BatchScheduler`) and checked with the task's `evaluate`.
  With `num_samples` = k a problem counts as solved when any of its k samples is right (pass@k).
  Chance is 0.

ChatCORE is the mean centered accuracy over the tasks run: (accuracy - chance) / (1 - chance), so that
guessing scores 0 and a perfect model 1 (core_eval's centering). Under torchrun example i is evaluated
on rank i % world_size and the counts are all-reduced, so every rank returns the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import takewhile
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanochat_rs.batching import BatchScheduler, SamplingParams
from nanochat_rs.common import get_dist_info, is_ddp_initialized
from nanochat_rs.conversation import render_for_completion
from nanochat_rs.core_eval import centered_accuracy, core_metric
from nanochat_rs.tasks.base import Conversation, Task
from nanochat_rs.util import check_int

if TYPE_CHECKING:
    from nanochat_rs.engine import Engine
    from nanochat_rs.gpt import GPT
    from nanochat_rs.tasks.mmlu import MultipleChoiceTask
    from nanochat_rs.tokenizer import Tokenizer

__all__ = ["CATEGORICAL_BATCH_SIZE", "CHAT_EVAL_TASKS", "GENERATIVE_BATCH_SIZE", "GENERATIVE_MAX_TOKENS", "Accuracy",
           "categorical_accuracy", "chatcore", "check_num_samples", "generative_accuracy", "offered_letters",
           "task_accuracy"]

# The registry tasks with an automatic check, in the order ChatCORE reports them (SmolTalk has none).
CHAT_EVAL_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "arithmetic", "letter-count",
                   "identity")
GENERATIVE_MAX_TOKENS = 128  # the synthetic tasks' replies are ~30 tokens; room for a wrong detour
GENERATIVE_BATCH_SIZE = 32  # replies decoded together: one forward per token serves them all
CATEGORICAL_BATCH_SIZE = 8  # prompts per forward: bounds the (batch, prompt length, vocab) logits


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    chance: float = 0.0  # the accuracy of guessing (0 for generative tasks)

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centered(self) -> float:
        """The accuracy rescaled so that guessing scores 0 and a perfect score 1."""
        return centered_accuracy(self.value, 100 * self.chance)


def chatcore(accuracies: Mapping[str, Accuracy]) -> float:
    """ChatCORE: the mean centered accuracy over the tasks."""
    return core_metric({name: accuracy.centered for name, accuracy in accuracies.items()})


def check_num_samples(num_samples: int, temperature: float) -> int:
    """`num_samples` checked for pass@k: k > 1 needs temperature > 0, or the k samples are one greedy reply."""
    num_samples = check_int("num_samples", num_samples, 1)
    if num_samples > 1 and temperature == 0:
        raise ValueError(f"num_samples={num_samples} (pass@{num_samples}) needs a temperature > 0: greedy "
                         "decoding gives the same reply every time")
    return num_samples


def _num_examples(task: Task, max_examples: int | None) -> int:
    return len(task) if max_examples is None else min(len(task), check_int("max_examples", max_examples, 1))


def _all_reduce(counts: list[int], device: torch.device) -> list[int]:
    """`counts` summed over ranks (as they are without a process group)."""
    if not is_ddp_initialized():
        return counts
    tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


# ---- generative --------------------------------------------------------------------------------


def generative_accuracy(engine: Engine, task: Task, max_examples: int | None = None,
                        max_tokens: int = GENERATIVE_MAX_TOKENS, temperature: float = 0.0,
                        seed: int = 0, num_samples: int = 1) -> Accuracy:
    """Replies (greedy by default) to the task's first `max_examples` conversations, judged by the task;
    with `num_samples` = k > 1 (and a temperature > 0), pass@k: right when any of the k samples is.

    The replies are generated together, `GENERATIVE_BATCH_SIZE` at a time, by the continuous-batching
    scheduler (greedy replies are the Engine's; a sample's seed is `seed + example index + sample`, so
    results do not depend on the number of ranks)."""
    num_samples = check_num_samples(num_samples, temperature)
    total = _num_examples(task, max_examples)
    tokenizer = engine.tokenizer
    context = engine.model.config.sequence_len
    info = get_dist_info()
    pending = []
    for index in range(info.rank, total, info.world_size):
        conversation = task[index]
        prompt = render_for_completion(tokenizer, conversation)
        room = context - len(prompt)
        if room > 0:  # a prompt that fills the context has no room for an answer: counted wrong
            params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature, seed=seed + index)
            pending.append((conversation, prompt, params))
    scheduler = BatchScheduler(engine.model, tokenizer, max_batch_size=GENERATIVE_BATCH_SIZE,
                               max_queue=len(pending) * num_samples)
    with scheduler:
        replies = [(conversation, scheduler.submit_many(prompt, params, num_samples))
                   for conversation, prompt, params in pending]
        while scheduler.step():  # this thread drives the loop until every request has finished
            pass
        correct = sum(any(task.evaluate(conversation, tokenizer.decode([event.token for event in handle]))
                          for handle in handles) for conversation, handles in replies)
    (correct,) = _all_reduce([correct], engine.model.get_device())
    return Accuracy(correct, total)


# ---- categorical -------------------------------------------------------------------------------


def offered_letters(task: MultipleChoiceTask, conversation: Conversation) -> tuple[str, ...]:
    """The answer letters a question offers: the first of the task's `letters` whose "=L" ends a choice
    line of the question (tasks.mmlu.render_mc); MMLU offers 4, ARC 3 to 5."""
    question = next(message["content"] for message in reversed(conversation) if message["role"] == "user")
    offered = tuple(takewhile(lambda letter: f"={letter}\n" in question, task.letters))
    if not offered:
        raise ValueError(f"{type(task).__name__}: the question offers none of the letters {task.letters}")
    return offered


def _letter_token(tokenizer: Tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"the answer letter {letter!r} is {len(ids)} tokens for this tokenizer; categorical "
                         "scoring reads one token's logit per letter")
    return ids[0]


@torch.no_grad()
def categorical_accuracy(model: GPT, tokenizer: Tokenizer, task: MultipleChoiceTask,
                         max_examples: int | None = None, batch_size: int = CATEGORICAL_BATCH_SIZE) -> Accuracy:
    """How often the likeliest offered letter after the first `max_examples` questions is the answer,
    scoring `batch_size` prompts per forward. `chance` is the mean of 1/(letters offered)."""
    if getattr(task, "eval_type", None) != "categorical":
        raise TypeError(f"{type(task).__name__} is not a categorical (multiple-choice) task")
    batch_size = check_int("batch_size", batch_size, 1)
    total = _num_examples(task, max_examples)
    letter_ids = {letter: _letter_token(tokenizer, letter) for letter in task.letters}
    context = model.config.sequence_len
    device = model.get_device()
    info = get_dist_info()
    offered_counts = [0] * (len(task.letters) + 1)  # questions by how many letters they offer
    questions = []
    for index in range(info.rank, total, info.world_size):
        conversation = task[index]
        offered = offered_letters(task, conversation)
        offered_counts[len(offered)] += 1
        prompt = render_for_completion(tokenizer, conversation)
        if len(prompt) <= context:  # a longer prompt does not fit the model: counted wrong
            questions.append((conversation, prompt, offered))
    questions.sort(key=lambda question: len(question[1]), reverse=True)  # similar lengths share a batch
    correct = 0
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        ids = torch.full((len(batch), len(batch[0][1])), tokenizer.bos_token_id, dtype=torch.long)
        for row, (_, prompt, _) in enumerate(batch):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        # causal attention: the padding after a prompt never changes the logits at its last position
        last = torch.tensor([len(prompt) - 1 for _, prompt, _ in batch], device=device)
        logits = model(ids.to(device))[torch.arange(len(batch), device=device), last].float().cpu()
        for row, (conversation, _, offered) in enumerate(batch):
            scores = logits[row, [letter_ids[letter] for letter in offered]]
            correct += bool(task.evaluate(conversation, offered[int(scores.argmax())]))
    correct, *offered_counts = _all_reduce([correct, *offered_counts], device)
    chance = sum(count / letters for letters, count in enumerate(offered_counts) if letters) / total if total else 0.0
    return Accuracy(correct, total, chance)


def task_accuracy(engine: Engine, task: Task, *, max_examples: int | None = None,
                  batch_size: int = CATEGORICAL_BATCH_SIZE, max_tokens: int = GENERATIVE_MAX_TOKENS,
                  temperature: float = 0.0, num_samples: int = 1, seed: int = 0) -> Accuracy:
    """`categorical_accuracy` or `generative_accuracy`, as the task's `eval_type` says (the sampling
    arguments apply to generative tasks, `batch_size` to categorical ones)."""
    kind = getattr(task, "eval_type", None)
    if kind == "categorical":
        return categorical_accuracy(engine.model, engine.tokenizer, task, max_examples,  # type: ignore[arg-type]
                                    batch_size)
    if kind == "generative":
        return generative_accuracy(engine, task, max_examples, max_tokens, temperature, seed, num_samples)
    raise TypeError(f"{type(task).__name__} has no eval_type ('categorical' or 'generative') to evaluate it by")
