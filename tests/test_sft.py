"""Spec for fine-tuning: the SFT schedules, task names and mixtures, the conversation loader, and the
job end to end on CPU (a tiny base model pretrained here, fine-tuned, resumed exactly).

Everything is generated in tmp_path: a small corpus and tokenizer for the base run, the embedded
synthetic tasks for fine-tuning (no download)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nanochat_rs import recipe
from nanochat_rs.chat_data import conversation_data_loader
from nanochat_rs.checkpoint import CheckpointError, find_steps, load_checkpoint, load_model, step_dir
from nanochat_rs.conversation import render_conversation
from nanochat_rs.finetune import SFTConfig, finetune, resolve_config
from nanochat_rs.pretrain import TrainConfig, train
from nanochat_rs.tasks import Arithmetic, Identity, TaskMixture
from nanochat_rs.tasks.custom_json import CustomJSON
from nanochat_rs.tasks.registry import TASKS, build_mixture, get_task, parse_task_specs
from nanochat_rs.tokenizer import Tokenizer
from test_train import write_corpus

REPO = Path(__file__).resolve().parent.parent

# ---- schedules --------------------------------------------------------------------------------------


def test_sft_lr_schedule_is_constant_then_decays_to_the_final_fraction() -> None:
    schedule = recipe.SFTSchedule(warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [schedule.lr_multiplier(p) for p in (0.0, 0.25, 0.5)] == [1.0, 1.0, 1.0]
    assert schedule.lr_multiplier(0.75) == pytest.approx(0.5)
    assert schedule.lr_multiplier(1.0) == 0.0
    warm = recipe.SFTSchedule(warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert warm.lr_multiplier(0.05) == pytest.approx(0.5)
    assert warm.lr_multiplier(1.0) == pytest.approx(0.1)


@given(st.floats(0, 1), st.floats(0, 1))
def test_sft_lr_multiplier_never_increases_after_warmup(a: float, b: float) -> None:
    schedule = recipe.DEFAULT_SFT_SCHEDULE
    low, high = sorted((a, b))
    assert 0.0 <= schedule.lr_multiplier(high) <= schedule.lr_multiplier(low) <= 1.0


def test_sft_momentum_ramps_over_300_steps() -> None:
    assert recipe.sft_muon_momentum(0) == pytest.approx(0.85)
    assert recipe.sft_muon_momentum(150) == pytest.approx(0.90)
    assert recipe.sft_muon_momentum(300) == recipe.sft_muon_momentum(10_000) == pytest.approx(0.95)


@pytest.mark.parametrize("kwargs", [dict(warmup_ratio=0.6, warmdown_ratio=0.6), dict(final_lr_frac=1.5),
                                    dict(warmdown_ratio=-0.1)])
def test_bad_sft_schedules_are_value_errors(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        recipe.SFTSchedule(**kwargs)


# ---- tasks by name -----------------------------------------------------------------------------------


def test_task_specs_parse_names_and_epochs(tmp_path: Path) -> None:
    assert parse_task_specs("arithmetic, identity:3") == [("arithmetic", 1), ("identity", 3)]
    assert parse_task_specs(f"{tmp_path}/my:data.jsonl:2") == [(f"{tmp_path}/my:data.jsonl", 2)]
    for bad, match in (("arithmetc", "unknown task 'arithmetc'; known tasks: smoltalk"),
                       ("identity:0", "epochs must be a positive integer"), ("identity:x", "epochs must be")):
        with pytest.raises(ValueError, match=match):
            parse_task_specs(bad)
    with pytest.raises(ValueError, match="evaluation only"):
        get_task("humaneval", "train")


def test_every_embedded_task_has_disjoint_splits() -> None:
    for name, info in TASKS.items():
        if info.embedded:
            train = {json.dumps(c) for c in get_task(name, "train", stop=300)}  # type: ignore[attr-defined]
            test = {json.dumps(c) for c in get_task(name, "test", stop=100)}  # type: ignore[attr-defined]
            assert not train & test, name


def test_a_mixture_empty_after_slicing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="the task mixture is empty"):
        build_mixture([("arithmetic", 2), ("identity", 1)], "train", max_examples=0)
    mixture = build_mixture([("arithmetic", 2), ("identity", 1)], "train", max_examples=5)
    assert len(mixture) == 2 * 5 + 5
    assert len(build_mixture([("arithmetic", 2)], "test", max_examples=5)) == 5  # held-out data once


@pytest.mark.parametrize(("line", "match"), [
    ('[{"role": "assistant", "content": "hi"}]', "turn 0 has role 'assistant' where 'user' was expected"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "turn 1 has role 'user'"),
    ("[]", "messages is empty"),
    ('{"messages": []}', "messages is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ("{not json", "not valid JSON"),
])
def test_custom_conversations_are_checked_line_by_line(tmp_path: Path, line: str, match: str) -> None:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "mine.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"mine.jsonl:3: .*{match}"):
        CustomJSON(path)
    path.write_text(f"{good}\n{good}\n")
    assert len(CustomJSON(path)) == 2 and CustomJSON(path)[1][1]["content"] == "hello"


# ---- the conversation loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer() -> Tokenizer:
    texts = [Arithmetic("train", size=50)[i][0]["content"] for i in range(50)] + ["There are 3 'r' in 'cherry'."] * 5
    return Tokenizer.train(texts, vocab_size=256 + 9 + 40)


def test_rows_hold_whole_conversations_supervised_exactly_where_the_mask_says(chat_tokenizer: Tokenizer) -> None:
    task = TaskMixture([Arithmetic("train", size=40), Identity("train")], seed=1)
    rendered = {}
    for i in range(len(task)):
        ids, mask = render_conversation(chat_tokenizer, task[i], 65)
        rendered[tuple(ids)] = mask
    bos = chat_tokenizer.bos_token_id
    loader = conversation_data_loader(chat_tokenizer, task, 4, 64)
    try:
        for _ in range(6):
            inputs, targets, state = next(loader)
            assert (inputs[:, 0] == bos).all()
            for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
                row = row_in + [row_tg[-1]]
                starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
                for start, end in zip(starts, starts[1:], strict=False):
                    piece = tuple(row[start:end])
                    if piece == (bos,) * len(piece) and all(t == -1 for t in row_tg[start:end]):
                        continue  # padding: BOS inputs, no targets
                    assert piece in rendered, "every row segment is a whole conversation"
                    mask = rendered[piece]
                    want = [tok if m else -1 for tok, m in zip(piece[1:], mask[1:], strict=True)]
                    got = row_tg[start:end - 1]
                    assert got == want
                    if end < len(row):
                        assert row_tg[end - 1] == -1  # the next conversation's BOS is never a target
    finally:
        loader.close()
    assert state["consumed"] > 0 and state["task_size"] == len(task)


def test_conversation_loader_resumes_with_the_same_batches(chat_tokenizer: Tokenizer) -> None:
    task = Arithmetic("train", size=300)
    first = conversation_data_loader(chat_tokenizer, task, 2, 48)
    batches = [next(first) for _ in range(8)]
    first.close()
    again = conversation_data_loader(chat_tokenizer, task, 2, 48, resume_state=batches[3][2])
    try:
        for inputs, targets, state in batches[4:]:
            got_inputs, got_targets, got_state = next(again)
            assert torch.equal(got_inputs, inputs) and torch.equal(got_targets, targets)
            assert got_state == state
    finally:
        again.close()
    other = Arithmetic("train", size=301)
    with pytest.raises(ValueError, match="task_size=300"):
        conversation_data_loader(chat_tokenizer, other, 2, 48, resume_state=batches[3][2])


def test_a_malformed_conversation_stops_the_loader_with_its_error(chat_tokenizer: Tokenizer) -> None:
    class OutOfOrder(Identity):
        def get_example(self, index: int) -> list:
            return list(reversed(super().get_example(index)))

    loader = conversation_data_loader(chat_tokenizer, OutOfOrder("train"), 2, 32)
    with pytest.raises(ValueError, match="turn 0 has role 'assistant' where 'user' was expected"):
        next(loader)
    loader.close()


# ---- the job end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NANOCHAT_BASE_DIR with a tokenizer and a 12-step depth-2 base run under base_checkpoints/d2."""
    root = tmp_path_factory.mktemp("sft")
    write_corpus(root / "data")
    texts = [Arithmetic("train", size=200)[i][1]["content"][2]["text"] for i in range(200)]
    Tokenizer.train(texts * 3, vocab_size=256 + 9 + 60).save(root / "tokenizer")
    config = TrainConfig(preset="cpu", device_type="cpu", depth=2, aspect_ratio=32, head_dim=32, sequence_len=64,
                         device_batch_size=2, total_batch_size=128, num_iterations=12, eval_every=0,
                         eval_tokens=128, sample_every=0, save_every=0, compile=False,
                         run_dir=str(root / "base_checkpoints" / "d2"), data_dir=str(root / "data"),
                         tokenizer_dir=str(root / "tokenizer"))
    with contextlib.redirect_stdout(io.StringIO()):
        train(config)
    return root


def sft_config(root: Path, run: str, **overrides: object) -> SFTConfig:
    config = SFTConfig(device_type="cpu", tasks="arithmetic,letter-count,identity", max_examples=48,
                       eval_every=4, eval_tokens=128, eval_examples=3, save_every=4, compile=False,
                       run_dir=str(root / run))
    return replace(config, **overrides)  # type: ignore[arg-type]


def run_sft(root: Path, config: SFTConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, str]:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        summary = finetune(config)
    return summary, log.getvalue()


@pytest.fixture(scope="module")
def full_sft(base_run: Path) -> tuple[dict, str]:
    mp = pytest.MonkeyPatch()
    try:
        return run_sft(base_run, sft_config(base_run, "chat_full"), mp)
    finally:
        mp.undo()


def test_sft_trains_one_epoch_of_the_mixture_from_the_newest_base_run(base_run: Path, full_sft: tuple) -> None:
    summary, log = full_sft
    assert summary["source"] == str(step_dir(base_run / "base_checkpoints" / "d2", 12))
    assert summary["conversations"] == 48 * 2 + len(Identity("train"))
    assert summary["steps"] >= 2 and "(100.0%)" in log  # ends when the epoch is used up
    assert set(summary["accuracy"]) == {"arithmetic", "letter-count", "identity"}
    assert set(summary["initial"]["accuracy"]) == set(summary["accuracy"])  # the base model's, at step 0
    assert summary["final_val_bpb"] is not None and summary["final_val_bpb"] > 0
    assert "Warm-started the optimizer" in log and "step 00000 | validation bpb" in log
    steps = find_steps(base_run / "chat_full")
    assert steps[-1] == summary["steps"]
    _, _, meta = load_checkpoint(base_run / "chat_full", device="cpu", load_optimizer=False)
    assert meta["source"]["step"] == 12 and meta["sft_config"]["tasks"] == "arithmetic,letter-count,identity"
    model, tokenizer, _ = load_model(base_run / "chat_full", "cpu")  # loads on its own, tokenizer included
    assert tokenizer.vocab_size == model.config.vocab_size


def test_sft_inherits_the_base_runs_settings(full_sft: tuple) -> None:
    _, log = full_sft
    assert "seq 64 | batch 128 tokens (1 micro-steps of 2x64)" in log


def test_sft_resume_is_bit_identical(base_run: Path, full_sft: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, _ = full_sft
    assert summary["steps"] > 4
    run = base_run / "chat_resumed"
    shutil.copytree(step_dir(base_run / "chat_full", 4), step_dir(run, 4))
    resumed, _ = run_sft(base_run, sft_config(base_run, "chat_resumed", resume=True), monkeypatch)
    assert resumed["steps"] == summary["steps"]
    want, _, _ = load_checkpoint(base_run / "chat_full", device="cpu", load_optimizer=False)
    got, _, _ = load_checkpoint(run, device="cpu", load_optimizer=False)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fixed_iterations_and_a_fresh_optimizer(base_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, log = run_sft(base_run, sft_config(base_run, "chat_fixed", num_iterations=3, load_optimizer=False,
                                                eval_every=0), monkeypatch)
    assert summary["steps"] == 3 and "step 00003/00003" in log and "Warm-started" not in log


def test_a_base_checkpoint_with_another_tokenizer_is_refused(base_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "d2"
    shutil.copytree(base_run / "base_checkpoints" / "d2", source)
    other = Tokenizer.train(["completely different text"] * 10, vocab_size=256 + 9 + 60)
    tokenizer_dir = step_dir(source, 12) / "tokenizer"
    shutil.rmtree(tokenizer_dir)
    other.save(tokenizer_dir)
    with pytest.raises(CheckpointError, match="is not the one this model was trained with"):
        run_sft(base_run, sft_config(base_run, "chat_x", source=str(source)), monkeypatch)


def test_no_base_checkpoint_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no base checkpoint under .*nanochat-train"):
        run_sft(tmp_path, sft_config(tmp_path, "chat"), monkeypatch)


def test_flag_errors_are_found_before_any_work() -> None:
    for overrides, match in ((dict(tasks="nope"), "unknown task 'nope'"), (dict(mixture="big"), "mixture must be"),
                             (dict(warmup_ratio=0.9, warmdown_ratio=0.9), "warmup_ratio \\+ warmdown_ratio"),
                             (dict(eval_examples=0), "eval_examples"), (dict(init_lr_frac=-1.0), "init_lr_frac")):
        with pytest.raises(ValueError, match=match):
            resolve_config(replace(SFTConfig(), **overrides), "cpu")  # type: ignore[arg-type]
    assert resolve_config(SFTConfig(), "cpu").mixture == "synthetic"
    assert resolve_config(SFTConfig(), "cuda").mixture == "nanochat"


def run_job(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root),
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nanochat_rs.sft", "--device-type", "cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.parametrize(("args", "code", "match"), [
    (("--tasks", "arithmetic,nonsense"), 2, "error: unknown task 'nonsense'"),
    (("--warmdown-ratio", "2"), 2, "error: warmdown_ratio"),
    (("--tasks", "arithmetic", "--max-examples", "0", "--no-compile"), 1, "error: the task mixture is empty"),
])
def test_job_errors_are_one_line(base_run: Path, args: tuple[str, ...], code: int, match: str) -> None:
    result = run_job(base_run, *args)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith(match) and result.stderr.count("\n") == 1, result.stderr


def test_job_lists_its_tasks_and_answers_help(tmp_path: Path) -> None:
    listing = run_job(tmp_path, "--list-tasks")
    assert listing.returncode == 0 and all(name in listing.stdout for name in TASKS)
    assert "--load-optimizer" in run_job(tmp_path, "--help").stdout
