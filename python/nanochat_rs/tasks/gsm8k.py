"""GSM8K (openai/gsm8k): grade-school word problems whose worked answers use the calculator tool.

The dataset's answers annotate each computation as `<<48/2=24>>`; these become tool calls, so the
model learns to compute through the calculator:

    assistant: [text "Natalia sold 48/2 = "] [python "48/2"] [python_output "24"] [text "24 clips ..."]

The text keeps everything between annotations verbatim, ending with the "#### 72" line that states
the final answer. A reply is right when the last number it states equals that final answer.
"""

from __future__ import annotations

import re
from decimal import Decimal

from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.hub import HubTask

_ANNOTATION = re.compile(r"<<([^>]*)>>")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> Decimal:
    # "1,000" and "1000.00" name the same answer
    return Decimal(text.replace(",", ""))


class GSM8K(HubTask):
    """One split ("train" or "test") of GSM8K's "main" config."""

    eval_type = "generative"
    REPO = "openai/gsm8k"
    SPLITS = {"main": ("train", "test")}

    def __init__(self, split: str = "train", **slice_args: int) -> None:
        super().__init__("main", split, ("question", "answer"), **slice_args)

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise self.malformed(index, "question and answer must be strings")
        if not _FINAL.search(answer):
            raise self.malformed(index, f"the answer does not end with a '#### N' line: {answer[-80:]!r}")
        parts = []
        pieces = _ANNOTATION.split(answer)  # text, annotation, text, annotation, ..., text
        for position, piece in enumerate(pieces):
            if position % 2 == 0:
                if piece:
                    parts.append({"type": "text", "text": piece})
                continue
            expression, equals, result = piece.rpartition("=")
            if not equals or not expression or not result:
                raise self.malformed(index, f"annotation <<{piece}>> is not of the form <<expression=result>>")
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        return [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]

    @staticmethod
    def answer(conversation: Conversation) -> str:
        """The reference final answer: N of the "#### N" line, as written (commas kept)."""
        match = _FINAL.search(conversation[-1]["content"][-1]["text"])
        assert match is not None  # get_example only builds conversations that end with it
        return match.group(1)

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        numbers = _NUMBER.findall(completion)
        return bool(numbers) and _number(numbers[-1]) == _number(self.answer(conversation))
