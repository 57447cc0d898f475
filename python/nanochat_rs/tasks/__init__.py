"""Tasks: datasets of conversations for fine-tuning and evaluation (one module per task).

Each example is a conversation in the format `nanochat_rs.conversation` renders (a list of
`{"role", "content"}` messages; assistant content may be a list of text / python / python_output
parts). Tasks slice (`Task(start, stop, step)`), mix (`TaskMixture`, a seeded shuffle) and chain
(`TaskSequence`). The synthetic tasks here need no download, so fine-tuning works offline.
"""

from nanochat_rs.tasks.arc import ARC
from nanochat_rs.tasks.arithmetic import Arithmetic
from nanochat_rs.tasks.base import CalculatorTask, Conversation, Task, TaskMixture, TaskSequence
from nanochat_rs.tasks.gsm8k import GSM8K
from nanochat_rs.tasks.hub import HubTask
from nanochat_rs.tasks.humaneval import HumanEval
from nanochat_rs.tasks.identity import Identity
from nanochat_rs.tasks.mmlu import MMLU
from nanochat_rs.tasks.smoltalk import SmolTalk
from nanochat_rs.tasks.spelling import LetterCount

__all__ = ["ARC", "GSM8K", "MMLU", "Arithmetic", "CalculatorTask", "Conversation", "HubTask", "HumanEval",
           "Identity", "LetterCount", "SmolTalk", "Task", "TaskMixture", "TaskSequence"]
