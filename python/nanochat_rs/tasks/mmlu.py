"""MMLU (cais/mmlu): four-way multiple choice over 57 subjects, and the rendering shared by such tasks.

    user:      Multiple Choice question: What is 2 + 2?
               - 3=A
               - 4=B
               ...
               Respond only with the letter of the correct answer.
    assistant: B

As in nanochat, the letter comes *after* its choice with no space before it ("=B"): small models bind
the letter to the choice better that way, and " B" and "B" are different tokens, so the prompt uses
exactly the token the answer does. Evaluation is categorical: the evaluator picks the likeliest of
`letters` and `evaluate` checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.hub import HubTask


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The user message of a multiple-choice question (nanochat's format)."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


class MultipleChoiceTask(HubTask):
    """A Hub task whose assistant answers one letter; a reply is right when it is that letter."""

    eval_type = "categorical"
    letters: tuple[str, ...]

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return completion.strip() == conversation[-1]["content"]


class MMLU(MultipleChoiceTask):
    """MMLU's "all" config (splits test, validation, dev) or, for training, "auxiliary_train"."""

    letters = ("A", "B", "C", "D")
    REPO = "cais/mmlu"
    SPLITS = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}
    _COLUMNS = ("question", "choices", "answer")

    def __init__(self, subset: str = "all", split: str = "test", **slice_args: int) -> None:
        # The auxiliary_train export wraps each row in a struct column named "train".
        columns = ("train",) if subset == "auxiliary_train" else self._COLUMNS
        super().__init__(subset, split, columns, **slice_args)

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        if self.config == "auxiliary_train":
            row = row["train"]
            if not isinstance(row, dict):
                raise self.malformed(index, "the 'train' column must hold a struct of the row's columns")
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str):
            raise self.malformed(index, f"question must be a string, got {question!r:.80}")
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise self.malformed(index, f"choices must be 4 strings, got {choices!r:.200}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise self.malformed(index, f"answer must be an index 0-3, got {answer!r}")
        return [{"role": "user", "content": render_mc(question, self.letters, choices)},
                {"role": "assistant", "content": self.letters[answer]}]
