"""Arithmetic through the calculator tool: a skill a small model can learn from scratch on a CPU.

    user:      What is 347 * 29?
    assistant: <|python_start|>347*29<|python_end|><|output_start|>10063<|output_end|>347 * 29 = 10063.

The assistant writes the expression for the tool (supervised), the engine forces the tool's output
(not supervised), and the assistant states the result. Examples are generated from a seed, so
nothing is downloaded; train and test are disjoint by construction (a fixed hash of the operands
and the operator assigns every problem to exactly one split).
"""

from __future__ import annotations

import operator

from nanochat_rs.calculator import format_result
from nanochat_rs.tasks.base import CalculatorTask, Conversation

TEST_SHARE = 10  # one problem in ten belongs to the test split
OPERATORS = {"+": (2, 9999), "-": (2, 9999), "*": (2, 999)}  # operand range per operator
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a}{op}{b}", "{a} {op} {b} = ?",
             "What's {a} {op} {b}?")


def problem_split(a: int, op: str, b: int) -> str:
    """The split a problem belongs to: a fixed function of the problem (never of the RNG)."""
    key = (a * 1_000_003 + b * 10_007 + "+-*".index(op)) % 1_000_000_007
    return "test" if key % TEST_SHARE == 0 else "train"


class Arithmetic(CalculatorTask):
    """`size` seeded problems of one split (+, -, * on integers), each answered with the calculator."""

    eval_type = "generative"
    DEFAULT_SIZES = {"train": 8_000, "test": 500}  # sized for minutes of CPU fine-tuning

    def problem(self, index: int) -> tuple[int, str, int, str]:
        """(a, op, b, question) of example `index`: drawn until the problem is in this split."""
        rng = self.rng(index)
        while True:
            op = rng.choice(sorted(OPERATORS))
            low, high = OPERATORS[op]
            a, b = rng.randint(low, high), rng.randint(low, high)
            if problem_split(a, op, b) == self.split:
                return a, op, b, rng.choice(PHRASINGS).format(a=a, op=op, b=b)

    def get_example(self, index: int) -> Conversation:
        a, op, b, question = self.problem(index)
        expression = f"{a}{op}{b}"
        # computed here, not by the calculator: its wall-clock deadline must not decide what the data is
        # (the test suite checks that the calculator gives the same output)
        answer = format_result(OPERATIONS[op](a, b))
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "python", "text": expression},
                {"type": "python_output", "text": answer},
                {"type": "text", "text": f"{a} {op} {b} = {answer}."},
            ]},
        ]
