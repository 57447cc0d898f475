"""Tasks by name: what the jobs' `--tasks` flags accept, and the mixtures they build from names.

Every task has a "train" split (what fine-tuning learns from; None for evaluation-only tasks) and a
"test" split (held out: validation loss and accuracy). Hub tasks download their data on first use
(`tasks.hub`); embedded ones need nothing. A name ending in `.jsonl` is a file of your own
conversations (`CustomJSON`); having no held-out part, it serves as both of its splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nanochat_rs.tasks.arc import ARC
from nanochat_rs.tasks.arithmetic import Arithmetic
from nanochat_rs.tasks.base import Task, TaskMixture
from nanochat_rs.tasks.custom_json import CustomJSON
from nanochat_rs.tasks.gsm8k import GSM8K
from nanochat_rs.tasks.humaneval import HumanEval
from nanochat_rs.tasks.identity import Identity
from nanochat_rs.tasks.mmlu import MMLU
from nanochat_rs.tasks.smoltalk import SmolTalk
from nanochat_rs.tasks.spelling import LetterCount

SPLITS = ("train", "test")
TaskFactory = Callable[..., Task]  # (**slice_args) -> Task


@dataclass(frozen=True)
class TaskInfo:
    description: str
    train: TaskFactory | None  # None: evaluation only
    test: TaskFactory
    embedded: bool  # True: generated in the package, no download


TASKS: dict[str, TaskInfo] = {
    "smoltalk": TaskInfo("general conversations (SmolTalk)", lambda **s: SmolTalk("train", **s),
                         lambda **s: SmolTalk("test", **s), False),
    "mmlu": TaskInfo("multiple choice, 57 subjects (MMLU; auxiliary_train for training)",
                     lambda **s: MMLU("auxiliary_train", "train", **s), lambda **s: MMLU("all", "test", **s), False),
    "gsm8k": TaskInfo("grade-school math with calculator calls (GSM8K)", lambda **s: GSM8K("train", **s),
                      lambda **s: GSM8K("test", **s), False),
    "arc-easy": TaskInfo("science multiple choice (ARC-Easy)", lambda **s: ARC("ARC-Easy", "train", **s),
                         lambda **s: ARC("ARC-Easy", "test", **s), False),
    "arc-challenge": TaskInfo("science multiple choice (ARC-Challenge)",
                              lambda **s: ARC("ARC-Challenge", "train", **s),
                              lambda **s: ARC("ARC-Challenge", "test", **s), False),
    "humaneval": TaskInfo("Python functions from docstrings (HumanEval, evaluation only)", None,
                          lambda **s: HumanEval("test", **s), False),
    "arithmetic": TaskInfo("+, -, * through the calculator tool (embedded)", lambda **s: Arithmetic("train", **s),
                           lambda **s: Arithmetic("test", **s), True),
    "letter-count": TaskInfo("counting letters in words through the calculator tool (embedded)",
                             lambda **s: LetterCount("train", **s), lambda **s: LetterCount("test", **s), True),
    "identity": TaskInfo("who the model is (embedded)", lambda **s: Identity("train", **s),
                         lambda **s: Identity("test", **s), True),
}


JSONL_SUFFIX = ".jsonl"


def is_file_task(name: str) -> bool:
    return name.endswith(JSONL_SUFFIX)


def check_task_name(name: str) -> TaskInfo:
    if is_file_task(name):
        return TaskInfo(f"conversations from {name}", lambda **s: CustomJSON(name, **s),
                        lambda **s: CustomJSON(name, **s), True)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or a FILE{JSONL_SUFFIX} of "
                         "conversations")
    return TASKS[name]


def get_task(name: str, split: str, **slice_args: int) -> Task:
    """Task `name`'s `split` ("train" or "test"), sliced by `start/stop/step`."""
    info = check_task_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    factory = info.train if split == "train" else info.test
    if factory is None:
        raise ValueError(f"task {name!r} is for evaluation only: it has no train split")
    return factory(**slice_args)


def parse_task_specs(text: str) -> list[tuple[str, int]]:
    """'arithmetic,identity:2' -> [("arithmetic", 1), ("identity", 2)]: names with optional epochs."""
    specs = []
    for item in text.split(","):
        name, colon, epochs_text = item.strip().rpartition(":")
        if not colon or not is_file_task(name) and is_file_task(epochs_text):  # no epochs given
            name, epochs_text = item.strip(), ""
        check_task_name(name)
        try:
            epochs = int(epochs_text) if epochs_text else 1
        except ValueError:
            raise ValueError(f"task {item.strip()!r}: epochs must be a positive integer (name:epochs)") from None
        if epochs < 1:
            raise ValueError(f"task {item.strip()!r}: epochs must be a positive integer (name:epochs)")
        specs.append((name, epochs))
    return specs


def build_mixture(specs: Sequence[tuple[str, int]], split: str, max_examples: int | None = None,
                  seed: int = 42) -> TaskMixture:
    """One seeded shuffle of every task's `split` repeated `epochs` times (the test split once), each
    cut to its first `max_examples`. ValueError if the result is empty."""
    slice_args = {} if max_examples is None else {"stop": max_examples}
    tasks = []
    for name, epochs in specs:
        task = get_task(name, split, **slice_args)
        tasks.extend([task] * (epochs if split == "train" else 1))
    return TaskMixture(tasks, seed=seed)
