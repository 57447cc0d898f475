"""The chat job end to end: a tiny checkpoint written here, the CLI run as a subprocess
(`python -m nanochat_rs.chat`, what the `nanochat-chat` entry point runs, and the scripts/chat.py
wrapper of a source checkout), and its answers checked against the Engine run in-process on the same
checkpoint."""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from nanochat_rs import chat as chat_module
from nanochat_rs import checkpoint
from nanochat_rs.checkpoint import load_model, save_checkpoint
from nanochat_rs.conversation import readable_reply, render_for_completion
from nanochat_rs.engine import Engine
from nanochat_rs.gpt import GPTConfig, build_model
from nanochat_rs.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "scripts" / "chat.py"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NANOCHAT_BASE_DIR holding a tokenizer and one tiny random checkpoint under chat_checkpoints/d2."""
    root = tmp_path_factory.mktemp("base")
    tokenizer = Tokenizer.train(["hello there, how are you? fine thanks. what is two plus two? four."] * 20,
                                vocab_size=256 + 9 + 40)
    tokenizer.save(root / "tokenizer")
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random matrices everywhere so the answer depends on the whole network
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
        for name in ("<|assistant_end|>", "<|bos|>"):  # never stop early: answers reach MAX_TOKENS
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    save_checkpoint(root / "chat_checkpoints" / "d2", 1, model, None,
                    {"dataloader_state": None, "tokenizer_dir": str(root / "tokenizer")})
    return root


@pytest.fixture(scope="module")
def reference(base: Path) -> tuple[Engine, Tokenizer]:
    model, tokenizer, _ = load_model(base / "chat_checkpoints" / "d2", "cpu")
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
    prompt = render_for_completion(reference[1], [{"role": "user", "content": text}])
    return prompt, greedy_reply(reference, prompt)


MODULE = ("-m", "nanochat_rs.chat")  # what `nanochat-chat` runs
WRAPPER = (str(CHAT),)


def chat_command(base: Path, *args: str, entry: tuple[str, ...] = MODULE,
                 env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base),
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return [sys.executable, *entry, "--device-type", "cpu", "--temperature", "0",
            "--max-tokens", str(MAX_TOKENS), *args], env


def run_chat(base: Path, *args: str, stdin: str = "", entry: tuple[str, ...] = MODULE,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion. Lone surrogates in `args`/`stdin` reach it as undecodable bytes."""
    command, env = chat_command(base, *args, entry=entry, env=env)
    return subprocess.run(command, input=stdin, capture_output=True, text=True, errors="surrogateescape",
                          env=env, timeout=120, check=False)


@pytest.mark.parametrize("entry", [MODULE, WRAPPER], ids=["module", "wrapper"])
def test_one_shot_prompt_prints_the_engine_answer(base: Path, reference: tuple[Engine, Tokenizer],
                                                  entry: tuple[str, ...]) -> None:
    result = run_chat(base, "--checkpoint", str(base / "chat_checkpoints" / "d2"), "-p", "hello there", entry=entry)
    assert result.returncode == 0, result.stderr
    _, reply = first_turn(reference, "hello there")
    answer = readable_reply(reference[1], reply)
    assert answer.strip(), "the test model should say something"
    assert result.stdout == answer + "\n"


def test_interactive_session_from_piped_stdin(base: Path, reference: tuple[Engine, Tokenizer]) -> None:
    """Default checkpoint discovery, 'clear' resetting the conversation, 'quit' leaving."""
    result = run_chat(base, stdin="hello there\nclear\nhello there\nquit\n")
    assert result.returncode == 0, result.stderr
    answer = readable_reply(reference[1], first_turn(reference, "hello there")[1])
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
    assert f"Assistant: {readable_reply(tokenizer, first)}\n" in result.stdout
    assert f"Assistant: {readable_reply(tokenizer, second)}\n" in result.stdout
    fresh = first_turn(reference, "how are you")[1]
    assert second != fresh, "the model should answer differently with the first turn in its context"


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "-p", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no checkpoints under") and result.stderr.count("\n") == 1
    # wheels ship no scripts/: the advice names the entry point
    assert "nanochat-train" in result.stderr and "scripts/" not in result.stderr


@pytest.mark.parametrize("stdin", ["empty", "closed"])
def test_no_input_ends_the_session_quietly(base: Path, stdin: str) -> None:
    """`nanochat-chat < /dev/null` and a closed stdin (`0<&-`) both mean: nothing to say."""
    command, env = chat_command(base)
    result = subprocess.run(command, stdin=subprocess.DEVNULL if stdin == "empty" else None,
                            preexec_fn=(lambda: os.close(0)) if stdin == "closed" else None,
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("nanochat_rs chat.") and "Assistant:" not in result.stdout


def write_marker(root: Path, run: str, step: int, mtime: int) -> None:
    marker = root / run / f"step_{step:06d}" / "meta.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    os.utime(marker, (mtime, mtime))


def test_default_checkpoint_is_the_most_recently_written_chat_model(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    default_checkpoint_dir = chat_module.default_checkpoint_dir
    write_marker(tmp_path, "base_checkpoints/d2", 5, mtime=3_000)
    write_marker(tmp_path, "base_checkpoints/d6", 7, mtime=2_000)
    (tmp_path / "chat_checkpoints" / "d8" / "step_000009").mkdir(parents=True)  # incomplete: no meta.json
    # no chat model yet: the newest base model, and a note saying so
    assert default_checkpoint_dir(tmp_path) == tmp_path / "base_checkpoints" / "d2"
    assert "Note: no chat model under" in capsys.readouterr().err
    write_marker(tmp_path, "chat_checkpoints/d4", 100, mtime=1_000)  # older than the base runs: still first
    assert default_checkpoint_dir(tmp_path) == tmp_path / "chat_checkpoints" / "d4"
    assert default_checkpoint_dir(tmp_path, "base") == tmp_path / "base_checkpoints" / "d2"
    write_marker(tmp_path, "chat_checkpoints", 1, mtime=4_000)  # steps directly under the root count too
    assert default_checkpoint_dir(tmp_path) == tmp_path / "chat_checkpoints"
    assert capsys.readouterr().err == ""
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        default_checkpoint_dir(tmp_path / "empty")


def test_without_a_chat_model_the_job_says_it_uses_the_base_model(base: Path, tmp_path: Path,
                                                                   reference: tuple[Engine, Tokenizer]) -> None:
    shutil.copytree(base / "chat_checkpoints" / "d2", tmp_path / "base_checkpoints" / "d2")
    result = run_chat(tmp_path, "-p", "hello there")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("Note: no chat model under") and "using the base model" in result.stderr
    assert result.stdout == readable_reply(reference[1], first_turn(reference, "hello there")[1]) + "\n"
    assert run_chat(tmp_path, "-p", "hello there", "--source", "base").stderr == ""


def test_tool_calls_read_as_text() -> None:
    tokenizer = Tokenizer.train(["What is 123 * 45? It is 5535."] * 20, vocab_size=256 + 9 + 10)
    sp = tokenizer.encode_special
    reply = [sp("<|python_start|>"), *tokenizer.encode("123*45"), sp("<|python_end|>"), sp("<|output_start|>"),
             *tokenizer.encode("5535"), sp("<|output_end|>"), *tokenizer.encode("123 * 45 = 5535.")]
    assert readable_reply(tokenizer, reply) == "[calculator] 123*45 -> 5535\n123 * 45 = 5535."
    assert readable_reply(tokenizer, tokenizer.encode("plain text")) == "plain text"


@pytest.mark.parametrize(("option", "match"), [
    (("--temperature", "nan"), "temperature must be a finite"),
    (("--top-k", "-1"), "--top-k must be >= 0"),
    (("--temperature", "1e-40"), "use 0 for greedy"),
    (("--temperature", "1e308"), "temperature 1e+308 is above 100"),
    (("--seed", str(2**70)), "seed must fit in 64 bits"),
    (("--seed", "-1"), "seed must fit in 64 bits"),
])
def test_bad_options_fail_before_loading_anything(tmp_path: Path, option: tuple[str, str], match: str) -> None:
    result = run_chat(tmp_path, "-p", "hi", *option)  # no checkpoint here: the options are checked first
    assert result.returncode == 2
    assert match in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(("variable", "value", "match"), [
    ("NANOCHAT_DTYPE", "bogus", "NANOCHAT_DTYPE='bogus' is not one of"),
    ("NANOCHAT_BASE_DIR", "FILE", "NANOCHAT_BASE_DIR"),
])
def test_bad_environment_is_a_one_line_error(tmp_path: Path, variable: str, value: str, match: str) -> None:
    not_a_directory = tmp_path / "a_file"
    not_a_directory.write_text("")
    base = not_a_directory if value == "FILE" else tmp_path
    result = run_chat(base, "-p", "hi", env={variable: str(base) if value == "FILE" else value})
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert match in result.stderr


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_unavailable_device_is_a_clear_error(base: Path) -> None:
    result = run_chat(base, "-p", "hi", "--device-type", "mps")
    assert result.returncode == 1
    assert result.stderr == "error: device_type='mps' requested but MPS is not available\n"


def test_undecodable_input_bytes_become_replacement_characters(base: Path,
                                                               reference: tuple[Engine, Tokenizer]) -> None:
    answer = reference[1].decode(first_turn(reference, "caf\ufffd")[1])
    one_shot = run_chat(base, "-p", "caf\udce9")  # b"caf\xe9": Latin-1, not UTF-8
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout == answer + "\n"
    piped = run_chat(base, stdin="caf\udce9\n")
    assert piped.returncode == 0, piped.stderr
    assert f"Assistant: {answer}\n" in piped.stdout


def test_reply_cut_off_by_the_context_is_reported(base: Path, reference: tuple[Engine, Tokenizer]) -> None:
    """The test model never stops, so a generous --max-tokens runs into its 64-token context."""
    engine, tokenizer = reference
    prompt = render_for_completion(tokenizer, [{"role": "user", "content": "hello there"}])
    reply = [column[0] for column, _ in engine.generate(prompt, max_tokens=64 - len(prompt), temperature=0.0)]
    result = run_chat(base, "--max-tokens", "100", stdin="hello there\nhow are you\n")
    assert result.returncode == 0, result.stderr
    assert f"Assistant: {readable_reply(tokenizer, reply)}\n" in result.stdout
    assert result.stderr == "(reply cut off: it reached the model's 64-token context)\n"
    # the full context leaves no room for another turn: said plainly, and the session goes on
    assert "(the conversation fills the model's 64-token context; type 'clear')" in result.stdout


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["default", "ignored"])
def test_ctrl_c_at_the_prompt_leaves_quietly(base: Path, inherited: signal.Handlers) -> None:
    """A shell starts background jobs (`cmd &`) with SIGINT ignored; the job must still stop on it."""
    command, env = chat_command(base)
    with subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, inherited)
                          ) as process:
        assert process.stdout is not None
        seen = b""
        while not seen.endswith(b"User: "):
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, "the CLI exited before prompting"
            seen += chunk
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stdout == b"\n"  # the prompt's line is ended
    assert stderr == b"interrupted\n"


def test_ctrl_c_while_loading_leaves_quietly(base: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "load_model", interrupted)
    try:
        with pytest.raises(SystemExit) as exit_info:
            chat_module.main(["--checkpoint", str(base / "chat_checkpoints" / "d2"), "--device-type", "cpu",
                              "-p", "hi"])
    except KeyboardInterrupt:  # caught here, or it would stop the whole test session
        pytest.fail("Ctrl-C while loading escaped main()")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_per_turn_seeds_stay_in_64_bits(reference: tuple[Engine, Tokenizer], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Each turn samples with its own seed (seed + turn): from the largest seed it must wrap, not overflow."""
    engine, tokenizer = reference
    chat = chat_module.Chat(engine, tokenizer, context=64, temperature=1.0, top_k=None, max_tokens=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nhow are you\n"))
    chat_module.chat_loop(chat, seed=2**64 - 1)
    assert capsys.readouterr().out.count("Assistant: ") == 2


def test_closed_stdout_is_not_a_traceback(base: Path) -> None:
    """`chat.py -p ... | head -c 1` closes the pipe early: the CLI must go without a traceback."""
    command, env = chat_command(base, "-p", "hello there")
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        process.stdout.close()  # before the CLI has written anything
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stderr == b""


class ScriptedEngine:
    """Stands in for the Engine: 'generates' a fixed list of tokens."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def generate(self, tokens: list[int], **kwargs: Any) -> Iterator[tuple[list[int], list[int]]]:
        return (([token], [1]) for token in self.tokens)


class RecordedWrites:
    """A stdout that keeps every non-empty write separately, to see what was shown when."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        if text:
            self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_streaming_holds_back_split_characters(reference: tuple[Engine, Tokenizer],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Token ids 0-255 are raw bytes: 'é' is 0xC3 0xA9. A reply cut after a lead byte still shows it
    (as U+FFFD) rather than silently dropping it."""
    tokenizer = reference[1]
    script = [ord("c"), 0xC3, 0xA9, 0xC3]
    chat = chat_module.Chat(ScriptedEngine(script), tokenizer, context=64, temperature=0.0,  # type: ignore[arg-type]
                            top_k=None, max_tokens=len(script))
    stdout = RecordedWrites()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert chat.answer([tokenizer.bos_token_id], seed=0) == script
    assert stdout.writes == ["c", "\u00e9", "\ufffd", "\n"]
