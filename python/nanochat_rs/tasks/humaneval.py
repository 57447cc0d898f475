"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, for evaluation only.

    user:      the function's signature and docstring (the dataset's `prompt`)
    assistant: the prompt followed by the canonical solution (the complete function, as nanochat
               gives it: the solution alone is an indented body that does not run by itself)

Judging a completion means running it against the row's unit tests, which needs the code-execution
sandbox of a later issue: until then `evaluate` raises TypeError rather than guess.
"""

from __future__ import annotations

from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.hub import HubTask


class HumanEval(HubTask):
    """The "test" split (the only one). `evaluate` is not implemented: it raises TypeError."""

    eval_type = "generative"
    REPO = "openai/openai_humaneval"
    SPLITS = {"openai_humaneval": ("test",)}

    def __init__(self, split: str = "test", **slice_args: int) -> None:
        super().__init__("openai_humaneval", split, ("task_id", "prompt", "canonical_solution"), **slice_args)

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        prompt, solution = row["prompt"], row["canonical_solution"]
        if not isinstance(prompt, str) or not isinstance(solution, str) or not prompt.strip():
            raise self.malformed(index, f"{row['task_id']!r}: prompt and canonical_solution must be strings")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{prompt}\n{solution}"}]

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        raise TypeError("HumanEval completions are judged by running the unit tests, which needs the "
                        "code-execution sandbox (not implemented yet)")
