"""The calculator tool: a sandboxed evaluator for the expressions the model writes between
<|python_start|> and <|python_end|>.

The model's output is untrusted input, so nothing here ever calls `eval`. The expression is parsed
with `ast` and walked by a tiny interpreter that only knows numeric literals, arithmetic operators,
a handful of pure math functions and `"literal".count("literal")`. There are no names, builtins,
attributes, subscripts, comprehensions or lambdas, so files, the network and the interpreter's
internals are simply unreachable.

Time is bounded in two layers:
  * every single step is cheap by construction: the input length and the node count are capped,
    integers are capped in size and `**` is refused *before* computing when its result would exceed
    the cap, so no one operation can take more than microseconds;
  * a deadline is checked before every step, so the whole evaluation is cut off at `timeout_s`
    (this works from any thread, unlike SIGALRM, and costs no process spawn per tool call).

`evaluate` never raises on user input: it returns an `Evaluation` with either a value or a reason.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 256
MAX_DEPTH = 100  # the interpreter recurses once per level: keep far below Python's recursion limit
MAX_INT_BITS = 512  # ~154 decimal digits: plenty for a calculator, cheap to compute and to tokenise
MAX_ROUND_DIGITS = 100
DEFAULT_TIMEOUT_S = 0.5

Number = int | float
Value = int | float | str  # str only ever appears as a literal feeding "...".count("...")

# Swapped out by tests to simulate a slow clock; production code always reads time.monotonic.
_clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Evaluation:
    """Outcome of one calculator call: `value` on success, otherwise `error` says why not."""

    value: Number | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Rejected(Exception):
    """Internal: the expression is not allowed or cannot be computed; the message is the reason."""


def _check_number(value: object) -> Number:
    """Every intermediate result passes through here, which is what keeps each step cheap."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Rejected(f"result of type {type(value).__name__} is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Rejected(f"integer result too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("result overflowed (not a finite number)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    """`base ** exponent`, refused before computing when the result could not fit the size cap."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 1 and abs(base) > 1:
        # log2(|base|) * exponent is the result's bit count; math.log2 accepts arbitrarily big ints.
        if math.log2(abs(base)) * exponent > MAX_INT_BITS:
            raise _Rejected(f"power too large: {base} ** {exponent} exceeds {MAX_INT_BITS} bits")
    # Float powers cost O(1) whatever the operands; overflow raises and is turned into a reason.
    return base**exponent


_BINARY_OPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}

_UNARY_OPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise _Rejected(f"round() digits must be an int with magnitude <= {MAX_ROUND_DIGITS}")
    return round(x, ndigits)


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise _Rejected("sqrt of a negative number")
    return math.sqrt(x)


# name -> (function, min args, max args); all pure, all O(1) on size-capped numbers.
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *xs: min(xs), 1, 16),
    "max": (lambda *xs: max(xs), 1, 16),
    "sqrt": (_sqrt, 1, 1),
}


class _Interpreter:
    """Walks a validated expression tree, checking the deadline before each step."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def _tick(self) -> None:
        if _clock() > self._deadline:
            raise _Rejected("evaluation timed out")

    def number(self, node: ast.expr) -> Number:
        value = self.eval(node)
        if isinstance(value, str):
            raise _Rejected("strings are only allowed as \"text\".count(\"sub\")")
        return value

    def eval(self, node: ast.expr) -> Value:
        self._tick()
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.BinOp):
            op = _BINARY_OPS.get(type(node.op))
            if op is None:
                raise _Rejected(f"operator {type(node.op).__name__} is not allowed")
            return _check_number(op(self.number(node.left), self.number(node.right)))
        if isinstance(node, ast.UnaryOp):
            unary = _UNARY_OPS.get(type(node.op))
            if unary is None:
                raise _Rejected(f"unary operator {type(node.op).__name__} is not allowed")
            return _check_number(unary(self.number(node.operand)))
        if isinstance(node, ast.Call):
            return self._call(node)
        raise _Rejected(f"{type(node).__name__} expressions are not allowed")

    @staticmethod
    def _constant(node: ast.Constant) -> Value:
        value = node.value
        if isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Rejected(f"literal {value!r} is not a number")
        return _check_number(value)

    def _call(self, node: ast.Call) -> Value:
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise _Rejected("keyword and starred arguments are not allowed")
        if isinstance(node.func, ast.Attribute):
            return self._string_count(node)
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            allowed = ", ".join(sorted(_FUNCTIONS))
            raise _Rejected(f"only these functions may be called: {allowed}")
        function, lo, hi = _FUNCTIONS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise _Rejected(f"{node.func.id}() takes {lo} to {hi} arguments, got {len(node.args)}")
        args = [self.number(arg) for arg in node.args]
        return _check_number(function(*args))

    @staticmethod
    def _string_count(node: ast.Call) -> int:
        """`"literal".count("literal")`: the one string operation, on literals only, so its cost is
        bounded by the input length and nothing outside the expression can be touched."""
        func, args = node.func, node.args
        if (isinstance(func, ast.Attribute) and func.attr == "count" and len(args) == 1
                and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)
                and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)):
            return func.value.value.count(args[0].value)
        raise _Rejected('attribute access is not allowed (except "text".count("sub") on string literals)')


def _parse(expression: str) -> ast.expr:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _Rejected(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not expression.strip():
        raise _Rejected("empty expression")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
        raise _Rejected(f"not a valid expression: {e.__class__.__name__}") from None
    _check_size(tree.body)
    return tree.body


def _check_size(root: ast.expr) -> None:
    """Cap node count (number of steps) and depth (interpreter recursion) before evaluating.

    Uses an explicit stack so that a pathological tree cannot blow the stack while being measured.
    """
    count = 0
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += isinstance(node, ast.expr)  # operator tags (ast.Add, ...) are not steps
        if count > MAX_NODES:
            raise _Rejected(f"expression has more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise _Rejected(f"expression is nested more than {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def evaluate(expression: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Evaluation:
    """Evaluate a calculator expression safely: `Evaluation(value)` or `Evaluation(None, reason)`.

    Allowed: int/float literals, + - * / // % **, unary + and -, parentheses, abs/round/min/max/sqrt
    and "text".count("sub") on string literals. Everything else is rejected with a reason.
    """
    if not isinstance(expression, str):
        return Evaluation(None, f"expression must be a str, got {type(expression).__name__}")
    try:
        deadline = _clock() + float(timeout_s)
        value = _Interpreter(deadline).eval(_parse(expression))
        if isinstance(value, str):
            raise _Rejected("the result is a string, not a number")
        return Evaluation(value)
    except _Rejected as e:
        return Evaluation(None, str(e))
    except ZeroDivisionError:
        return Evaluation(None, "division by zero")
    except OverflowError:  # float arithmetic past ~1.8e308
        return Evaluation(None, "result overflowed (not a finite number)")
    except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as e:
        return Evaluation(None, f"cannot compute: {e.__class__.__name__}: {e}")


def format_result(value: Number) -> str:
    """The text forced into the model's context as the tool output."""
    return str(value)
