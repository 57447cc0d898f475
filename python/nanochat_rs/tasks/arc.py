"""ARC (allenai/ai2_arc): grade-school science questions, Easy and Challenge, as multiple choice.

Rendered exactly like MMLU (`render_mc`). Questions have 3 to 5 choices and some label them "1".."4"
instead of "A".."D"; choices are relabelled A, B, C... by position so that every answer is a letter
token, whatever the source labels.
"""

from __future__ import annotations

from nanochat_rs.tasks.base import Conversation
from nanochat_rs.tasks.mmlu import MultipleChoiceTask, render_mc

_SPLITS = ("train", "validation", "test")


class ARC(MultipleChoiceTask):
    """One split of "ARC-Easy" or "ARC-Challenge"; answers are among the first len(choices) `letters`."""

    letters = ("A", "B", "C", "D", "E")
    REPO = "allenai/ai2_arc"
    SPLITS = {"ARC-Easy": _SPLITS, "ARC-Challenge": _SPLITS}

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **slice_args: int) -> None:
        super().__init__(subset, split, ("question", "choices", "answerKey"), **slice_args)

    def get_example(self, index: int) -> Conversation:
        row = self.row(index)
        question, choices, key = row["question"], row["choices"], row["answerKey"]
        if not isinstance(question, str):
            raise self.malformed(index, f"question must be a string, got {question!r:.80}")
        texts = choices.get("text") if isinstance(choices, dict) else None
        labels = choices.get("label") if isinstance(choices, dict) else None
        if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels)
                and 3 <= len(texts) <= len(self.letters) and all(isinstance(t, str) for t in texts)):
            raise self.malformed(index, f"choices must hold 3-5 texts and as many labels, got {choices!r:.200}")
        if key not in labels:
            raise self.malformed(index, f"answerKey {key!r} is not one of the labels {labels}")
        letters = self.letters[:len(texts)]
        return [{"role": "user", "content": render_mc(question, letters, texts)},
                {"role": "assistant", "content": letters[labels.index(key)]}]
