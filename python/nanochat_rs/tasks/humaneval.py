"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, for evaluation only.

    user:      the function's signature and docstring (the dataset's `prompt`)
    assistant: the prompt followed by the canonical solution (the complete function, as nanochat
               gives it: the solution alone is an indented body that does not run by itself)

A completion is judged by running, in the code sandbox (`nanochat_rs.execution`), the problem's prompt,
then the completion's code (its first ``` fenced block if it has one, else all of it, as nanochat
extracts it), then the problem's tests and `check(entry_point)`. The prompt goes first so the
completion may be the whole function (it replaces the prompt's docstring-only stub and can use the
prompt's imports and helper functions) or only its body (the classic HumanEval continuation).
"""

from __future__ import annotations

import re

from nanochat_rs.execution import execute_code
from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.hub import HubTask

_FENCED_CODE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a reply: the first ```python (or bare ```) fenced block, else the whole reply."""
    match = _FENCED_CODE.search(completion)
    return completion if match is None else match.group(1)


class HumanEval(HubTask):
    """The "test" split (the only one). `evaluate` runs the problem's unit tests in the sandbox."""

    eval_type = "generative"
    REPO = "openai/openai_humaneval"
    SPLITS = {"openai_humaneval": ("test",)}

    def __init__(self, split: str = "test", **slice_args: int) -> None:
        super().__init__("openai_humaneval", split, ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
                         **slice_args)
        # evaluate() gets a conversation, not an index: its user message (the prompt) names the problem
        prompts = self.table.column("prompt").to_pylist()
        self._index_of_prompt = {prompts[row]: index for index, row in enumerate(self.order)}

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        prompt, solution = row["prompt"], row["canonical_solution"]
        if not isinstance(prompt, str) or not isinstance(solution, str) or not prompt.strip():
            raise self.malformed(index, f"{row['task_id']!r}: prompt and canonical_solution must be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{prompt}\n{solution}"}]

    def program(self, conversation: Conversation, completion: str) -> str:
        """The program that passes when `completion` solves the problem `conversation` poses."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        first = conversation[0] if isinstance(conversation, list) and conversation else None
        prompt = first.get("content") if isinstance(first, dict) else None
        index = self._index_of_prompt.get(prompt) if isinstance(prompt, str) else None
        if index is None:
            raise ValueError("the conversation does not start with the prompt of a problem of this HumanEval split")
        row = self.row(index)
        test, entry_point = row["test"], row["entry_point"]
        if not isinstance(test, str) or not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise self.malformed(index, f"{row['task_id']!r}: test must be a string and entry_point an identifier")
        return f"{prompt}\n{extract_code(completion)}\n\n{test}\n\ncheck({entry_point})\n"

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return execute_code(self.program(conversation, completion)).success
