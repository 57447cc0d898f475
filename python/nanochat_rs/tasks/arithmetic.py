"""Arithmetic through the calculator tool: a skill a small model can learn from scratch on a CPU.

    user:      What is 347 * 29?
    assistant: <|python_start|>347*29<|python_end|><|output_start|>10063<|output_end|>347 * 29 = 10063.

The assistant writes the expression for the tool (supervised), the engine forces the tool's output
(not supervised), and the assistant states the result. Examples are generated from a seed, so
nothing is downloaded; train and test are disjoint by construction (a fixed hash of the operands
and the operator assigns every problem to exactly one split).
"""

from __future__ import annotations

from nanochat_rs.calculator import evaluate, format_result
from nanochat_rs.tasks.base import CalculatorTask, Conversation

TEST_SHARE = 10  # one problem in ten belongs to the test split
OPERATORS = {"+": (2, 9999), "-": (2, 9999), "*": (2, 999)}  # operand range per operator
PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a}{op}{b}", "{a} {op} {b} = ?",
             "What's {a} {op} {b}?")


def problem_split(a: int, op: str, b: int) -> str:
    """The split a problem belongs to: a fixed function of the problem (never of the RNG)."""
    key = (a * 1_000_003 + b * 10_007 + "+-*".index(op)) % 1_000_000_007
    return "test" if key % TEST_SHARE == 0 else "train"


class Arithmetic(CalculatorTask):
    """`size` seeded problems of one split (+, -, * on integers), each answered with the calculator."""

    eval_type = "generative"
    DEFAULT_SIZES = {"train": 20_000, "test": 500}

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
        result = evaluate(expression)
        assert result.ok and result.value is not None  # operands are small integers
        answer = format_result(result.value)
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "python", "text": expression},
                {"type": "python_output", "text": answer},
                {"type": "text", "text": f"{a} {op} {b} = {answer}."},
            ]},
        ]
