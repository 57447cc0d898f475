"""scripts/chat.py end to end: a tiny checkpoint written here, the CLI run as a subprocess, and its
answers checked against the Engine run in-process on the same checkpoint."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nanochat_rs.checkpoint import load_model, save_checkpoint
from nanochat_rs.engine import Engine
from nanochat_rs.gpt import GPT, GPTConfig
from nanochat_rs.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "scripts" / "chat.py"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NANOCHAT_BASE_DIR holding a tokenizer and one tiny random checkpoint under checkpoints/d2."""
    root = tmp_path_factory.mktemp("base")
    tokenizer = Tokenizer.train(["hello there, how are you? fine thanks. what is two plus two? four."] * 20,
                                vocab_size=256 + 9 + 40)
    tokenizer.save(root / "tokenizer")
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random matrices everywhere so the answer depends on the whole network
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
        for name in ("<|assistant_end|>", "<|bos|>"):  # never stop early: answers reach MAX_TOKENS
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    save_checkpoint(root / "checkpoints" / "d2", 1, model, None,
                    {"dataloader_state": None, "tokenizer_dir": str(root / "tokenizer")})
    return root


@pytest.fixture(scope="module")
def reference(base: Path) -> tuple[Engine, Tokenizer]:
    model, tokenizer, _ = load_model(base / "checkpoints" / "d2", "cpu")
    return Engine(model, tokenizer), tokenizer


def greedy_reply(reference: tuple[Engine, Tokenizer], prompt: list[int]) -> list[int]:
    """The reply tokens the CLI should produce for `prompt`, computed in-process."""
    engine, tokenizer = reference
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    reply: list[int] = []
    for column, _ in engine.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0):
        if column[0] in stop:
            break
        reply.append(column[0])
    return reply


def first_turn(reference: tuple[Engine, Tokenizer], text: str) -> tuple[list[int], list[int]]:
    """(prompt, reply) of a conversation's first turn, the prompt as conversation.py renders it."""
    prompt = reference[1].render_for_completion([{"role": "user", "content": text}])
    return prompt, greedy_reply(reference, prompt)


def run_chat(base: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base),
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(CHAT), "--device-type", "cpu", "--temperature", "0",
                           "--max-tokens", str(MAX_TOKENS), *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_one_shot_prompt_prints_the_engine_answer(base: Path, reference: tuple[Engine, Tokenizer]) -> None:
    result = run_chat(base, "--checkpoint", str(base / "checkpoints" / "d2"), "-p", "hello there")
    assert result.returncode == 0, result.stderr
    _, reply = first_turn(reference, "hello there")
    answer = reference[1].decode(reply)
    assert answer.strip(), "the test model should say something"
    assert result.stdout == answer + "\n"


def test_interactive_session_from_piped_stdin(base: Path, reference: tuple[Engine, Tokenizer]) -> None:
    """Default checkpoint discovery, 'clear' resetting the conversation, 'quit' leaving."""
    result = run_chat(base, stdin="hello there\nclear\nhello there\nquit\n")
    assert result.returncode == 0, result.stderr
    answer = reference[1].decode(first_turn(reference, "hello there")[1])
    # after 'clear' the same question in a fresh conversation gets the same greedy answer
    assert result.stdout.count(f"Assistant: {answer}\n") == 2
    assert "(conversation cleared)" in result.stdout


def test_second_turn_sees_the_first(base: Path, reference: tuple[Engine, Tokenizer]) -> None:
    result = run_chat(base, stdin="hello there\nhow are you\n")  # EOF ends the session
    assert result.returncode == 0, result.stderr
    tokenizer = reference[1]
    prompt, first = first_turn(reference, "hello there")
    sp = tokenizer.encode_special
    second_prompt = [*prompt, *first, sp("<|assistant_end|>"), sp("<|user_start|>"),
                     *tokenizer.encode("how are you"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    second = greedy_reply(reference, second_prompt)
    assert f"Assistant: {tokenizer.decode(first)}\n" in result.stdout
    assert f"Assistant: {tokenizer.decode(second)}\n" in result.stdout
    fresh = first_turn(reference, "how are you")[1]
    assert second != fresh, "the model should answer differently with the first turn in its context"


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "-p", "hi")
    assert result.returncode != 0
    assert "no checkpoints under" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_checkpoint_is_the_most_recently_written(tmp_path: Path) -> None:
    default_checkpoint_dir = runpy.run_path(str(CHAT))["default_checkpoint_dir"]

    def write_marker(run: str, step: int, mtime: int) -> None:
        marker = tmp_path / run / f"step_{step:06d}" / "meta.json"
        marker.parent.mkdir(parents=True)
        marker.write_text("{}")
        os.utime(marker, (mtime, mtime))

    write_marker("checkpoints/d4", 100, mtime=1_000)
    write_marker("base_checkpoints/d2", 5, mtime=3_000)
    write_marker("base_checkpoints/d6", 7, mtime=2_000)
    (tmp_path / "checkpoints" / "d8" / "step_000009").mkdir(parents=True)  # incomplete: no meta.json
    assert default_checkpoint_dir(tmp_path) == tmp_path / "base_checkpoints" / "d2"
    write_marker("checkpoints", 1, mtime=4_000)  # steps directly under the root count too
    assert default_checkpoint_dir(tmp_path) == tmp_path / "checkpoints"
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        default_checkpoint_dir(tmp_path / "empty")
