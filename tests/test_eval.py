"""Spec for chat_eval.py (categorical and generative accuracy, pass@k, ChatCORE) and the evaluation job
(eval.py, `nanochat-eval`).

Multiple-choice questions are ARC rows placed by hand under $NANOCHAT_BASE_DIR/task_data (used with no
network access). A stub model whose logits depend only on the current token knows the answer by
construction: after <|assistant_start|> it says B, after BOS (the padding token) A, so reading a padded
position instead of a prompt's last real one would answer A. A random tiny GPT checks batched scoring
against one prompt per forward. The Hub and the CORE bundle URL are a closed port or a 127.0.0.1 server
that answers 404 to everything.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
from nanochat_rs.chat_eval import (
    Accuracy,
    categorical_accuracy,
    chatcore,
    generative_accuracy,
    task_accuracy,
)
from nanochat_rs.checkpoint import load_model, save_checkpoint
from nanochat_rs.conversation import render_for_completion
from nanochat_rs.core_eval import evaluate_core
from nanochat_rs.engine import Engine
from nanochat_rs.eval import EvalConfig, default_chat_tasks, main, run_eval
from nanochat_rs.gpt import GPTConfig
from nanochat_rs.tasks import ARC, Arithmetic
from nanochat_rs.tasks.base import Conversation, Task
from nanochat_rs.tasks.hub import split_dir
from nanochat_rs.tasks.registry import get_task
from nanochat_rs.tokenizer import Tokenizer

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
from model_helpers import random_gpt  # noqa: E402
from test_core_eval import HAND_LM, HAND_MC, write_bundle  # noqa: E402

SYNTHETIC = ("arithmetic", "letter-count", "identity")
HUB_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = ["Which is a mammal? trout, eagle, whale. What is 12 + 30? It is 42. hello, who are you?"]
    return Tokenizer.train(corpus * 20, vocab_size=256 + 9 + 40)


def tiny_config(tok: Tokenizer, sequence_len: int = 64) -> GPTConfig:
    return GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                     n_embd=64, window_pattern="L")


@pytest.fixture(scope="module")
def run_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat run of one tiny random GPT (step 1, tokenizer inside the step directory)."""
    root = tmp_path_factory.mktemp("run") / "chat_checkpoints" / "d2"
    save_checkpoint(root, 1, random_gpt(tiny_config(tok)), None, {"dataloader_state": None}, tokenizer=tok)
    return root


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty NANOCHAT_BASE_DIR, the Hub at a closed port, no data directory configured."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    return tmp_path


class NotFound(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_error(404, "not found")

    do_HEAD = do_GET


@pytest.fixture
def not_found_server() -> Iterator[str]:
    """A reachable server that has nothing: 404 to every request."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- multiple choice ----------------------------------------------------------------------------------

ARC_ROWS = [  # 3, 4 and 5 choices, prompts of different lengths, answers B and others
    {"question": "Which is a mammal?", "answerKey": "C", "choices": {"text": ["trout", "eagle", "whale"],
                                                                      "label": ["A", "B", "C"]}},
    {"question": "What is 12 + 30?", "answerKey": "B", "choices": {"text": ["41", "42", "43", "44"],
                                                                    "label": ["A", "B", "C", "D"]}},
    {"question": "Hi?", "answerKey": "B", "choices": {"text": ["no", "yes", "maybe", "hm", "eh"],
                                                      "label": ["A", "B", "C", "D", "E"]}},
    {"question": "Which gas do plants take in?", "answerKey": "D",
     "choices": {"text": ["O2", "N2", "He", "CO2"], "label": ["A", "B", "C", "D"]}},
    {"question": "Who are you?", "answerKey": "B", "choices": {"text": ["a cat", "a model", "a fish"],
                                                               "label": ["A", "B", "C"]}},
]
ANSWERED_B = sum(row["answerKey"] == "B" for row in ARC_ROWS)
CHANCE = sum(1 / len(row["choices"]["text"]) for row in ARC_ROWS) / len(ARC_ROWS)


def place_arc_easy(base: Path) -> None:
    """ARC-Easy's test split, placed by hand: loaded with no network access."""
    directory = split_dir(ARC.REPO, "ARC-Easy", "test")
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), directory / "0.parquet")


class LastTokenModel(nn.Module):
    """Logits from the current token alone: <|assistant_start|> favours B, BOS (the padding) A more
    strongly. Records the shape of every batch."""

    def __init__(self, tok: Tokenizer, sequence_len: int = 128) -> None:
        super().__init__()
        table = torch.zeros(tok.vocab_size, tok.vocab_size)
        table[tok.encode_special("<|assistant_start|>"), tok.encode("B")[0]] = 5.0
        table[tok.bos_token_id, tok.encode("A")[0]] = 10.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.shapes: list[tuple[int, ...]] = []

    def get_device(self) -> torch.device:
        return self.table.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(ids.shape))
        return self.table[ids]


def predictions(task: Task, score: Callable[[], Accuracy]) -> dict[str, str]:
    """The letter `score()` answers to each question (by its prompt), seen through the task's `evaluate`."""
    seen: dict[str, str] = {}
    judge = task.evaluate

    def recording(conversation: Conversation, completion: str) -> bool:
        seen[conversation[0]["content"]] = completion
        return judge(conversation, completion)

    task.evaluate = recording  # type: ignore[method-assign]
    try:
        score()
    finally:
        del task.evaluate
    return seen


def test_the_likeliest_offered_letter_at_the_last_real_position_is_the_answer(base: Path, tok: Tokenizer) -> None:
    place_arc_easy(base)
    task = get_task("arc-easy", "test")
    model = LastTokenModel(tok)
    accuracy = categorical_accuracy(model, tok, task, batch_size=4)
    assert set(predictions(task, lambda: categorical_accuracy(model, tok, task, batch_size=4)).values()) == {"B"}
    assert (accuracy.correct, accuracy.total) == (ANSWERED_B, len(ARC_ROWS))
    assert accuracy.chance == pytest.approx(CHANCE)  # guessing among 3, 4 or 5 offered letters
    assert model.shapes[0][0] == 4 and len(model.shapes) == 2 * 2  # 4 + 1 prompts per call
    assert len({shape[1] for shape in model.shapes}) > 1  # padded to each batch's longest prompt
    assert categorical_accuracy(model, tok, task, max_examples=2).total == 2


def test_batched_scoring_equals_one_prompt_per_forward_on_a_random_gpt(base: Path, tok: Tokenizer) -> None:
    place_arc_easy(base)
    task = get_task("arc-easy", "test")
    model = random_gpt(tiny_config(tok, sequence_len=128))
    oracle = {}
    for row in ARC_ROWS:
        conversation = next(task[i] for i in range(len(task)) if row["question"] in task[i][0]["content"])
        letters = "ABCDE"[:len(row["choices"]["text"])]
        with torch.no_grad():
            logits = model(torch.tensor([render_for_completion(tok, conversation)]))[0, -1]
        scores = [logits[tok.encode(letter)[0]].item() for letter in letters]
        oracle[conversation[0]["content"]] = letters[scores.index(max(scores))]
    for batch_size in (1, 2, 8):
        assert predictions(task, partial(categorical_accuracy, model, tok, task, batch_size=batch_size)) == oracle


def test_a_task_without_letters_is_not_categorical(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="not a categorical"):
        categorical_accuracy(LastTokenModel(tok), tok, Arithmetic("test", size=2))  # type: ignore[arg-type]


# ---- generative, pass@k -------------------------------------------------------------------------------


class ScriptedVerdicts(Arithmetic):
    """Arithmetic whose `evaluate` answers from a script: the j-th reply judged for problem i gets
    script[i][j], whatever the model said (so pass@k's counting is tested, not the model)."""

    def __init__(self, script: list[list[bool]]) -> None:
        super().__init__("test", size=len(script))
        self.script = script
        self.calls: dict[str, int] = {}

    def evaluate(self, conversation: Any, completion: str) -> bool:
        question = conversation[0]["content"]
        index = next(i for i in range(len(self)) if self[i][0]["content"] == question)
        call = self.calls.get(question, 0)
        self.calls[question] = call + 1
        return self.script[index][call]


def test_pass_at_k_counts_a_problem_when_any_sample_is_right(tok: Tokenizer) -> None:
    engine = Engine(random_gpt(tiny_config(tok)), tok)
    script = [[False, True], [False, False], [True, False]]
    assert generative_accuracy(engine, ScriptedVerdicts(script), num_samples=2, temperature=1.0,
                               max_tokens=4) == Accuracy(2, 3)
    assert generative_accuracy(engine, ScriptedVerdicts(script), max_tokens=4) == Accuracy(1, 3)  # first only
    with pytest.raises(ValueError, match="needs a temperature > 0"):
        generative_accuracy(engine, ScriptedVerdicts(script), num_samples=2, temperature=0.0)


def test_generative_accuracy_judges_the_engines_greedy_replies(tok: Tokenizer) -> None:
    """On a random GPT that never emits special tokens the Engine's reply is plain greedy decoding: the
    task sees exactly what the reference sampler (GPT.generate) produces."""
    model = random_gpt(tiny_config(tok))
    with torch.no_grad():
        for name in ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|output_start|>"):
            model.lm_head.weight[tok.encode_special(name)] = 0.0  # logit 0: never the argmax
    task = Arithmetic("test", size=3)
    seen = predictions(task, lambda: generative_accuracy(Engine(model, tok), task, max_tokens=8))
    for i in range(3):
        prompt = render_for_completion(tok, task[i])
        assert seen[task[i][0]["content"]] == tok.decode(model.generate(prompt, max_tokens=8, temperature=0.0))
    assert task_accuracy(Engine(model, tok), task, max_tokens=8).total == 3


# ---- ChatCORE -------------------------------------------------------------------------------------------


def test_centered_accuracy_and_chatcore() -> None:
    letters = Accuracy(30, 40, chance=0.25)
    generated = Accuracy(1, 4)
    assert letters.centered == pytest.approx((0.75 - 0.25) / 0.75)
    assert Accuracy(10, 40, chance=0.25).centered == pytest.approx(0.0)  # guessing scores 0
    assert generated.centered == 0.25  # chance 0: the accuracy itself
    assert chatcore({"arc-easy": letters, "gsm8k": generated}) == pytest.approx((2 / 3 + 0.25) / 2)
    with pytest.raises(ValueError, match="at least one task"):
        chatcore({})


# ---- the job ----------------------------------------------------------------------------------------------


def run_job(base: Path, *args: str,
            entry: tuple[str, ...] = ("-m", "nanochat_rs.eval")) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_offline_chat_eval_runs_the_embedded_tasks_with_a_note(base: Path, run_dir: Path) -> None:
    shutil.copytree(run_dir, base / "chat_checkpoints" / "d2")
    result = run_job(base, "--source", "chat", "--max-per-task", "2", "--device-type", "cpu")  # HF_ENDPOINT: closed
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Note: the Hub \(http://127\.0\.0\.1:\d+\) is unreachable and arc-easy, arc-challenge, mmlu, "
                     r"gsm8k, humaneval not downloaded: evaluating the embedded tasks only\.", result.stdout, re.M)
    rows = re.findall(r"^(\S+) +\d+\.\d\d% +-?\d\.\d{4}  \d/2$", result.stdout, re.M)
    assert tuple(rows) == SYNTHETIC
    assert re.search(r"^ChatCORE: -?\d\.\d{4} \(mean centered accuracy over 3 tasks\)$", result.stdout, re.M)


def test_the_wrapper_script_is_the_job() -> None:
    result = run_job(REPO, "--help", entry=(str(REPO / "scripts" / "eval.py"),))
    assert result.returncode == 0 and result.stdout.startswith("usage: nanochat-eval")


def test_hub_tasks_on_disk_are_evaluated_offline(base: Path, not_found_server: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    place_arc_easy(base)
    names, note = default_chat_tasks()
    assert names == ["arc-easy", *SYNTHETIC]
    assert note is not None and "arc-challenge, mmlu, gsm8k, humaneval not downloaded" in note
    monkeypatch.setenv("HF_ENDPOINT", not_found_server)  # reachable: everything can be downloaded
    assert default_chat_tasks() == ([*HUB_TASKS, *SYNTHETIC], None)


def test_run_eval_returns_the_table_as_a_dict(base: Path, run_dir: Path) -> None:
    results = run_eval(EvalConfig(checkpoint=str(run_dir), tasks="arithmetic,identity", max_per_task=2,
                                  device_type="cpu"))
    assert (results["source"], results["checkpoint"], results["step"]) == ("chat", str(run_dir), 1)
    assert list(results["tasks"]) == ["arithmetic", "identity"]
    for task in results["tasks"].values():
        assert task["total"] == 2 and task["chance"] == 0 and task["centered"] == task["accuracy"]
    assert results["chatcore"] == pytest.approx(sum(t["centered"] for t in results["tasks"].values()) / 2)


def test_base_eval_reports_core_val_bpb_and_samples(base: Path, run_dir: Path, tok: Tokenizer,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(run_dir, base / "base_checkpoints" / "d2")
    bundle = write_bundle(base / "eval_bundle", [HAND_MC, HAND_LM])
    results = run_eval(EvalConfig(source="base", device_type="cpu"))
    out = capsys.readouterr().out
    model, _, _ = load_model(run_dir, "cpu")
    expected = evaluate_core(model, tok, bundle_dir=bundle, log=None)
    assert results["core"] == pytest.approx(expected.core)
    assert {label: task["accuracy"] for label, task in results["tasks"].items()} == expected.accuracy
    assert f"CORE: {expected.core:.4f} (mean centered accuracy over 2 tasks)" in out
    assert math.isfinite(results["val_bpb"]) and results["val_bpb"] > 0 and "validation bpb: " in out
    assert len(results["samples"]) == 4 and out.count("sample: ") == 4


def test_base_eval_without_a_bundle_skips_core_unless_asked_for(base: Path, run_dir: Path, not_found_server: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{not_found_server}/eval_bundle.zip")
    results = run_eval(EvalConfig(source="base", checkpoint=str(run_dir), tasks=None, device_type="cpu"))
    assert "core" not in results and "val_bpb" in results
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note: CORE skipped")]
    assert len(notes) == 1 and "NANOCHAT_EVAL_BUNDLE_URL" in notes[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "base", "--checkpoint", str(run_dir), "--tasks", "core", "--device-type", "cpu"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "NANOCHAT_EVAL_BUNDLE_URL" in error


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--tasks", "arithmetic,nope"], 2, "unknown task 'nope'"),
    (["--tasks", "smoltalk"], 2, "task 'smoltalk' has no automatic evaluation"),
    (["--source", "base", "--tasks", "arithmetic"], 2, "--source base evaluates core, bpb, samples"),
    (["--num-samples", "4"], 2, "num_samples=4 (pass@4) needs a temperature > 0"),
    (["--max-per-task", "0"], 2, "--max-per-task must be >= 1"),
    ([], 1, "no checkpoints under"),  # an empty NANOCHAT_BASE_DIR: the usage errors above came first
])
def test_bad_requests_are_one_line_errors(base: Path, args: list[str], code: int, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--device-type", "cpu"])
    assert exit_info.value.code == code
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error


def test_a_checkpoint_without_its_tokenizer_is_a_checkpoint_error(base: Path, run_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = shutil.copytree(run_dir, base / "copy")
    shutil.rmtree(copy / "step_000001" / "tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(copy), "--tasks", "identity", "--device-type", "cpu"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"error: checkpoint {copy / 'step_000001'} has no tokenizer: "
                                       f"{copy / 'step_000001' / 'tokenizer'} is missing or empty (a step directory "
                                       "is copied whole, with its tokenizer/ folder)\n")
