"""Spec for nanochat_rs.tasks: slicing, mixtures and sequences, and the offline synthetic tasks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs.calculator import evaluate, format_result
from nanochat_rs.conversation import render_conversation
from nanochat_rs.tasks import Arithmetic, Identity, LetterCount, Task, TaskMixture, TaskSequence
from nanochat_rs.tasks.arithmetic import problem_split
from nanochat_rs.tasks.spelling import word_split
from nanochat_rs.tokenizer import Tokenizer


class Numbers(Task):
    """Example i is a one-message conversation holding i."""

    def __init__(self, n: int, **slice_args: int) -> None:
        super().__init__(**slice_args)
        self.n = n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> list[dict]:
        return [{"role": "user", "content": str(index)}]


def values(task: Task) -> list[int]:
    return [int(task[i][0]["content"]) for i in range(len(task))]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 30), start=st.integers(0, 35), stop=st.none() | st.integers(0, 35), step=st.integers(1, 5))
def test_slicing_is_python_slicing(n: int, start: int, stop: int | None, step: int) -> None:
    task = Numbers(n, start=start, stop=stop, step=step)
    assert values(task) == list(range(n))[start:stop:step]


def test_indexing_is_bounds_checked_and_accepts_negative_indices() -> None:
    task = Numbers(5, start=1)
    assert task[-1][0]["content"] == "4"
    for bad in (4, -5):
        with pytest.raises(IndexError, match="has 4 examples"):
            task[bad]
    with pytest.raises(TypeError):
        task[1.5]  # type: ignore[index]


def test_a_sequence_chains_and_a_mixture_shuffles_every_example_once() -> None:
    parts = [Numbers(3), Numbers(4, start=10)]  # the second is empty after slicing
    assert values(TaskSequence(parts)) == [0, 1, 2]
    mixture = TaskMixture([Numbers(50), Numbers(50)], seed=1)
    mixed = values(mixture)
    assert sorted(mixed) == sorted(list(range(50)) * 2) and mixed != sorted(mixed)
    assert values(TaskMixture([Numbers(50), Numbers(50)], seed=1)) == mixed  # seeded
    assert values(TaskMixture([Numbers(50), Numbers(50)], seed=2)) != mixed


def test_an_empty_mixture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="mixture is empty"):
        TaskMixture([Numbers(5, start=5), Numbers(0)])
    with pytest.raises(ValueError, match="at least one task"):
        TaskSequence([])


@pytest.mark.parametrize("task", [Arithmetic, LetterCount, Identity])
def test_unknown_split_is_a_clear_error(task: type) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        task("validation")


# ---- arithmetic ------------------------------------------------------------------------------------


def test_arithmetic_splits_are_disjoint_and_deterministic() -> None:
    train, test = Arithmetic("train", size=3000), Arithmetic("test", size=300)
    train_problems = {train.problem(i)[:3] for i in range(len(train))}
    test_problems = {test.problem(i)[:3] for i in range(len(test))}
    assert not train_problems & test_problems
    assert all(problem_split(*p) == "test" for p in test_problems)
    assert Arithmetic("train", size=10)[7] == train[7]  # the same seed, the same example
    assert Arithmetic("train", size=10, seed=1)[7] != train[7]


def test_arithmetic_answers_are_the_calculator_results_of_the_question() -> None:
    import operator

    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    task = Arithmetic("test", size=200)
    for i in range(len(task)):
        a, op, b, question = task.problem(i)
        conversation = task[i]
        assert conversation[0]["content"] == question and str(a) in question and str(b) in question
        python, output, text = conversation[1]["content"]
        assert python == {"type": "python", "text": f"{a}{op}{b}"}
        assert output["text"] == str(ops[op](a, b)) and text["text"].endswith(f"= {ops[op](a, b)}.")
        # what the engine will force at inference: the calculator's own output for the call
        assert format_result(evaluate(python["text"], timeout_s=60).value) == output["text"]  # type: ignore[arg-type]


def test_arithmetic_evaluation_reads_the_final_answer() -> None:
    task = Arithmetic("test", size=5)
    conversation = task[0]
    answer = Arithmetic.answer(conversation)
    a, op, b, _ = task.problem(0)
    engine_reply = (f"<|python_start|>{a}{op}{b}<|python_end|><|output_start|>{answer}<|output_end|>"
                    f"{a} {op} {b} = {answer}.<|assistant_end|>")
    assert task.evaluate(conversation, engine_reply)
    assert task.evaluate(conversation, f"The answer is {answer}")
    assert not task.evaluate(conversation, f"{answer} is close, but it is {int(answer) + 1}")
    assert not task.evaluate(conversation, "I don't know")
    # the tool's forced output is not the assistant's answer: it must state the result itself
    assert not task.evaluate(conversation, f"<|python_start|>{a}{op}{b}<|python_end|><|output_start|>{answer}"
                                           "<|output_end|>")
    assert not task.evaluate(conversation, f"<|python_start|>{a}{op}{b}<|python_end|><|output_start|>{answer}"
                                           "<|output_end|>I think it is 7.")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = "What is 12 * 34? Compute 5 + 6. How many 'r' are in 'cherry'? There are 2. nanochat_rs " * 30
    return Tokenizer.train([text], vocab_size=256 + 9 + 50)


@pytest.mark.parametrize("task", [Arithmetic("train", size=20), LetterCount("train", size=20), Identity()])
def test_examples_render_with_the_tool_call_supervised_and_its_output_not(task: Task,
                                                                          tokenizer: Tokenizer) -> None:
    python_start, output_start = tokenizer.encode_special("<|python_start|>"), tokenizer.encode_special(
        "<|output_start|>")
    for i in range(len(task)):
        ids, mask = render_conversation(tokenizer, task[i], max_tokens=10**6)
        assert any(mask)
        if python_start in ids:
            assert mask[ids.index(python_start)] == 1 and mask[ids.index(output_start)] == 0


# ---- letter counting and identity ----------------------------------------------------------------


def test_letter_count_words_are_disjoint_and_counts_are_right() -> None:
    train, test = LetterCount("train"), LetterCount("test")
    assert test.words and not set(train.words) & set(test.words)
    assert all(word_split(w) == "test" for w in test.words)
    for i in range(100):
        conversation = test[i]
        python, output, _ = conversation[1]["content"]
        word, letter = python["text"].split("'")[1], python["text"].split("'")[3]
        assert word in test.words and output["text"] == str(word.count(letter))
        assert format_result(evaluate(python["text"], timeout_s=60).value) == output["text"]  # type: ignore[arg-type]
        assert test.evaluate(conversation, f"There are {word.count(letter)} '{letter}'.")
        assert not test.evaluate(conversation, f"There are {word.count(letter) + 1} '{letter}'.")
    # training also asks about made-up strings (to teach copying), never about a held-out word
    asked = [train[i][1]["content"][0]["text"].split("'")[1] for i in range(400)]
    made_up = [w for w in asked if w not in train.words]
    assert 0.35 < len(made_up) / len(asked) < 0.65 and not set(asked) & set(test.words)


def test_identity_names_the_model_and_holds_out_questions() -> None:
    train, test = Identity("train"), Identity("test")
    train_questions = {train[i][0]["content"] for i in range(len(train))}
    test_questions = {test[i][0]["content"] for i in range(len(test))}
    assert test_questions and not train_questions & test_questions
    assert all("nanochat_rs" in train[i][1]["content"] for i in range(len(train)))
    assert test.evaluate(test[0], "I'm nanochat_rs.") and not test.evaluate(test[0], "I'm ChatGPT.")
