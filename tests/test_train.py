"""Spec for pretraining: the depth dial's hyperparameters, and end-to-end CPU runs with exact resume.

The end-to-end runs use a tiny generated corpus and tokenizer in tmp_path (never /work/shared) and the
real tokenizer, dataloader, model, optimizer and checkpoint code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nanochat_rs import fp8, recipe, training
from nanochat_rs.checkpoint import (
    META_FILE,
    CheckpointError,
    find_steps,
    load_checkpoint,
    load_model,
    loader_filename,
    step_dir,
)
from nanochat_rs.pretrain import TrainConfig, check_fp8_device, plan_training, resolve_config, train
from nanochat_rs.tokenizer import Tokenizer
from nanochat_rs.training import StepTimer, peak_flops, progress_line

REPO = Path(__file__).resolve().parent.parent
REFERENCE_BATCH_TOKENS = 2**19
BASE_LRS = {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}  # nanochat's
BASE_WEIGHT_DECAY = 0.28

# ---- the depth dial ------------------------------------------------------------------------------


def speedrun(depth: int, **overrides: object) -> TrainConfig:
    return resolve_config(TrainConfig(preset="speedrun", depth=depth, **overrides), "cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("depth, dims", [(1, (128, 1)), (2, (128, 1)), (12, (768, 6)), (20, (1280, 10)),
                                         (26, (1664, 13)), (13, (896, 7))])
def test_model_dims_round_up_to_whole_heads(depth: int, dims: tuple[int, int]) -> None:
    config = plan_training(speedrun(depth), vocab_size=32768).model_config
    assert (config.n_embd, config.n_head) == dims
    assert config.n_kv_head == config.n_head and config.n_layer == depth


@given(ratio=st.floats(1e-3, 1e3), micro_exp=st.integers(0, 20))
def test_batch_is_a_nearby_power_of_two_multiple_of_the_micro_step(ratio: float, micro_exp: int) -> None:
    micro = 2**micro_exp
    batch = recipe.optimal_batch_tokens(ratio * 1e9, 1e9, micro)
    ideal = REFERENCE_BATCH_TOKENS * ratio**0.383
    assert batch % micro == 0 and batch >= micro
    assert batch & (batch - 1) == 0  # power-of-two micro steps keep the power of two
    if batch > micro:
        assert abs(math.log2(batch) - math.log2(ideal)) <= 0.5 + 1e-9


def test_depth_12_is_the_reference_point() -> None:
    plan = plan_training(speedrun(12), vocab_size=32768)
    assert plan.model_config.n_embd == 768 and plan.model_config.n_head == 6
    assert plan.total_batch_size == REFERENCE_BATCH_TOKENS
    assert plan.lr_scale == 1.0 and plan.lrs == BASE_LRS
    assert plan.target_tokens == 8 * plan.num_scaling_params
    assert plan.num_iterations == round(plan.target_tokens / plan.total_batch_size)
    assert plan.weight_decay == pytest.approx(BASE_WEIGHT_DECAY, rel=0.01)  # iterations are rounded
    assert plan.grad_accum_steps == 2**19 // (32 * 2048)


def test_scaling_laws_across_depths() -> None:
    plans = {d: plan_training(speedrun(d), vocab_size=32768) for d in (8, 12, 16, 20, 26, 32)}
    ref = plans[12]
    ref_d = 8 * ref.num_scaling_params
    for depth, plan in plans.items():
        b = plan.total_batch_size
        ideal = REFERENCE_BATCH_TOKENS * (plan.target_tokens / ref_d) ** 0.383
        assert abs(math.log2(b) - math.log2(ideal)) <= 0.5 + 1e-9, depth  # power of two nearest the law
        assert plan.lr_scale == pytest.approx(math.sqrt(b / REFERENCE_BATCH_TOKENS))
        for name, base in BASE_LRS.items():
            assert plan.lrs[name] == pytest.approx(base * plan.lr_scale)
        trained = plan.num_iterations * b
        # weight decay keeps B / (lr * wd * D) at the depth-12 value (lr = the matrix LR)
        invariant = b / (plan.lrs["matrix_lr"] * plan.weight_decay * trained)
        assert invariant == pytest.approx(REFERENCE_BATCH_TOKENS / (BASE_LRS["matrix_lr"] * BASE_WEIGHT_DECAY * ref_d))
    batches = [plans[d].total_batch_size for d in sorted(plans)]
    assert batches == sorted(batches) and batches[-1] > batches[0]


def test_explicit_overrides_win() -> None:
    plan = plan_training(speedrun(12, total_batch_size=2**18, num_iterations=77), vocab_size=32768)
    assert plan.total_batch_size == 2**18 and plan.num_iterations == 77
    assert plan.lr_scale == pytest.approx(math.sqrt(0.5))


def test_cpu_preset_is_tiny_and_unscaled() -> None:
    config = resolve_config(TrainConfig(), "cpu")
    assert config.preset == "cpu" and config.sequence_len <= 512
    plan = plan_training(config, vocab_size=4096)
    assert plan.model_config.n_embd <= 256
    assert plan.lr_scale == 1.0 and plan.weight_decay == BASE_WEIGHT_DECAY
    assert resolve_config(TrainConfig(), "cuda").preset == "speedrun"


def test_bad_configs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="preset"):
        resolve_config(TrainConfig(preset="huge"), "cpu")
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        resolve_config(TrainConfig(depth=0), "cpu")
    with pytest.raises(ValueError, match="num_iterations"):
        resolve_config(TrainConfig(num_iterations=-5), "cpu")
    with pytest.raises(ValueError, match="resume_step"):
        resolve_config(TrainConfig(resume_step=3), "cpu")
    with pytest.raises(ValueError, match="not a multiple"):
        plan_training(resolve_config(TrainConfig(total_batch_size=1000), "cpu"), vocab_size=4096)
    for ratio in (math.inf, math.nan, -1.0, 0.0):
        with pytest.raises(ValueError, match="target_param_data_ratio must be a finite number in"):
            resolve_config(TrainConfig(target_param_data_ratio=ratio), "cpu")
    with pytest.raises(ValueError, match="matrix_lr must be a finite number in"):
        resolve_config(TrainConfig(matrix_lr=math.nan), "cpu")
    with pytest.raises(ValueError, match="warmdown_ratio"):
        resolve_config(TrainConfig(warmdown_ratio=2.0), "cpu")


def test_recipe_flags_reach_the_plan_and_the_schedule() -> None:
    config = resolve_config(TrainConfig(matrix_lr=0.04, embedding_lr=0.1, unembedding_lr=0.002, scalar_lr=0.3,
                                        weight_decay=0.1, warmup_steps=5, warmdown_ratio=0.5, final_lr_frac=0.0),
                            "cpu")
    plan = plan_training(config, vocab_size=4096)
    assert plan.lrs == {"embedding_lr": 0.1, "unembedding_lr": 0.002, "matrix_lr": 0.04, "scalar_lr": 0.3}
    assert plan.weight_decay == 0.1
    assert config.schedule == recipe.Schedule(warmup_steps=5, warmdown_ratio=0.5, final_lr_frac=0.0)
    defaults = resolve_config(TrainConfig(), "cpu")
    assert (defaults.matrix_lr, defaults.embedding_lr, defaults.unembedding_lr, defaults.scalar_lr,
            defaults.weight_decay) == (0.02, 0.3, 0.008, 0.5, 0.28)
    assert defaults.schedule == recipe.Schedule(warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)


def test_train_script_help() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--help"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--depth", "--device-type", "--fp8", "--no-compile", "--device-batch-size", "--total-batch-size",
                 "--num-iterations", "--sequence-len", "--max-seq-len", "--eval-every", "--eval-tokens",
                 "--sample-every",
                 "--save-every", "--resume", "--run-dir", "--preset", "--data-dir", "--seed", "--matrix-lr",
                 "--embedding-lr", "--unembedding-lr", "--scalar-lr", "--weight-decay", "--warmup-steps",
                 "--warmdown-ratio", "--final-lr-frac", "--target-param-data-ratio"):
        assert flag in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_script_reports_a_missing_device_in_one_line() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--device-type", "cuda"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: device_type='cuda' requested but torch sees no CUDA device"


# ---- MFU accounting -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "flops"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2250e12), ("Tesla T4", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_mfu_denominator_is_the_peak_of_the_gpu_in_use(name: str, flops: float | None) -> None:
    assert peak_flops(name) == flops


def test_progress_line_mfu_is_model_flops_over_the_peak_of_all_gpus() -> None:
    # 1e9 FLOPs/token x 2**19 tokens in 1 s on 8 GPUs of 1e15 FLOP/s each: 2**19 / 8e6 of the peak
    line = progress_line(5, 0.5, 2.5, 1.0, 2**19, None, 1e9, 1e15, 8, 10)
    mfu = float(re.search(r"\| mfu ([\d.]+)%", line).group(1))  # type: ignore[union-attr]
    assert mfu == pytest.approx(100 * 2**19 / 8e6, abs=0.01)
    assert "mfu" not in progress_line(5, 0.5, 2.5, 1.0, 2**19, None, 1e9, None, 8, 10)


def test_eta_follows_the_recent_step_time() -> None:
    """Steps that slow from 0.1 s to 1 s: the ETA is the recent pace times the steps left (it said 1
    min left for 8 min of work when it averaged over the whole run)."""
    timer = StepTimer(window=5)
    assert timer.eta_seconds(100) is None
    for _ in range(50):
        timer.add(0.1)
    for _ in range(5):
        timer.add(1.0)
    assert timer.eta_seconds(480) == pytest.approx(480.0)
    line = progress_line(5, 0.5, 2.5, 1.0, 2**19, timer.eta_seconds(480), 1e9, None, 1, 10)
    assert line.endswith("| eta 8.0 min")


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An A100 has CUDA but no fp8 GEMMs: refuse before building the model, not deep inside _scaled_mm."""
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: False)
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        check_fp8_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_fp8_device(torch.device("cpu"))


# ---- end to end on CPU ------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "bright jugs of mead and the river runs past old stone bridges").split()


def write_corpus(directory: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for shard in range(3):  # two training shards, the last one is validation
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "." for _ in range(120)]
        pq.write_table(pa.table({"text": docs}), directory / f"shard_{shard:05d}.parquet", row_group_size=30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_corpus(root / "data")
    texts = pq.read_table(root / "data" / "shard_00000.parquet").column("text").to_pylist()
    Tokenizer.train(texts, vocab_size=256 + 9 + 60).save(root / "tokenizer")
    return root


def tiny_config(root: Path, run: str, **overrides: object) -> TrainConfig:
    # eager: compiling costs tens of seconds per run on CPU; compiled == eager is tested in test_optim
    config = TrainConfig(preset="cpu", device_type="cpu", depth=2, aspect_ratio=32, head_dim=32, sequence_len=32,
                         device_batch_size=2, total_batch_size=128, num_iterations=20, eval_every=10,
                         eval_tokens=128, sample_every=10, sample_max_tokens=4, save_every=10, compile=False,
                         run_dir=str(root / run), data_dir=str(root / "data"),
                         tokenizer_dir=str(root / "tokenizer"))
    return replace(config, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def full_run(workspace: Path) -> tuple[Path, dict, str]:
    """One uninterrupted 20-step run: (run dir, summary, printed log)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            summary = train(tiny_config(workspace, "run_full"))
    finally:
        mp.undo()
    return workspace / "run_full", summary, log.getvalue()


def test_twenty_step_run_trains_and_checkpoints(full_run: tuple[Path, dict, str]) -> None:
    run_dir, summary, _ = full_run
    assert summary["steps"] == 20 and summary["tokens_trained"] == 20 * 128
    assert math.isfinite(summary["final_val_bpb"]) and summary["final_val_bpb"] > 0
    assert summary["min_val_bpb"] <= summary["final_val_bpb"]
    assert find_steps(run_dir) == [10, 20]
    meta = load_checkpoint(run_dir)[2]
    assert meta["step"] == 20 and meta["dataloader_state"] is not None
    # the (large) loader state sits in its own per-rank file, not in the meta.json inference reads
    assert "dataloader_state" not in json.loads((step_dir(run_dir, 20) / META_FILE).read_text())
    assert meta["plan"]["grad_accum_steps"] == 2
    model, tokenizer, _ = load_model(run_dir, "cpu")
    ids = tokenizer.encode("the quick brown", prepend="<|bos|>")
    out = list(model.generate(ids, max_tokens=5, temperature=0.0))
    assert len(out) == 5 and all(0 <= t < tokenizer.vocab_size for t in out)


def test_training_reduces_validation_loss(full_run: tuple[Path, dict, str]) -> None:
    _, summary, log = full_run
    evals = {int(step): float(bpb) for step, bpb in re.findall(r"step (\d+) \| validation bpb ([\d.]+)", log)}
    assert sorted(evals) == [0, 10, 20]
    assert evals[20] < evals[0] and evals[20] == pytest.approx(summary["final_val_bpb"], abs=1e-6)
    assert summary["final_loss"] < math.log(256 + 9 + 60)  # better than uniform over the vocabulary


def test_progress_log(full_run: tuple[Path, dict, str]) -> None:
    _, _, log = full_run
    steps = re.findall(r"^step (\d+)/00020 .*\| loss [\d.]+ \| dt .* \| tok/s [\d,]+", log, flags=re.M)
    assert [int(s) for s in steps] == list(range(1, 21))
    assert re.search(r"^step 00020/00020 .*\| eta [\d.]+ min", log, flags=re.M)
    assert log.count("sample: ") == 2 * 4  # at steps 10 and 20, four prompts each
    assert "final val bpb" in log and "wall time" in log


def test_resume_is_bit_identical(full_run: tuple[Path, dict, str], workspace: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _, _ = full_run
    resumed = workspace / "run_resumed"
    resumed.mkdir()
    shutil.copytree(step_dir(run_dir, 10), step_dir(resumed, 10))  # as if killed right after step 10
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    summary = train(tiny_config(workspace, "run_resumed", resume=True))
    assert summary["steps"] == 20
    want_model, want_optim, want_meta = load_checkpoint(run_dir, step=20)
    got_model, got_optim, got_meta = load_checkpoint(resumed, step=20)
    assert want_model.keys() == got_model.keys()
    for key in want_model:
        assert torch.equal(want_model[key], got_model[key]), key
    assert _states_equal(want_optim, got_optim)
    assert got_meta["dataloader_state"] == want_meta["dataloader_state"]


def test_resume_with_different_data_order_diverges(full_run: tuple[Path, dict, str], workspace: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the test above: the comparison is sensitive to the batches actually seen."""
    run_dir, _, _ = full_run
    other = workspace / "run_other"
    shutil.copytree(step_dir(run_dir, 10), step_dir(other, 10))
    (step_dir(other, 10) / loader_filename(0)).write_text("null")  # restart the data stream from the beginning
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    train(tiny_config(workspace, "run_other", resume=True, eval_every=0, sample_every=0))
    want = load_checkpoint(run_dir, step=20, load_optimizer=False)[0]
    got = load_checkpoint(other, step=20, load_optimizer=False)[0]
    assert any(not torch.equal(want[k], got[k]) for k in want)


def _states_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_resume_rejects_a_different_model(full_run: tuple[Path, dict, str], workspace: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    with pytest.raises(ValueError, match="cannot resume"):
        train(tiny_config(workspace, "run_full", resume=True, depth=3))
    with pytest.raises(FileNotFoundError):
        train(tiny_config(workspace, "no_such_run", resume=True))


def test_resume_past_the_planned_iterations_is_a_clear_error(full_run: tuple[Path, dict, str], workspace: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    with pytest.raises(ValueError, match="at step 20, past this run's 15 iterations"):
        train(tiny_config(workspace, "run_full", resume=True, num_iterations=15))


def test_resume_with_another_number_of_ranks_is_a_clear_error(full_run: tuple[Path, dict, str], workspace: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank reads its own stride of the data and owns an optimizer shard, so the saved per-rank
    states only fit the same world size."""
    run_dir, _, _ = full_run
    other = workspace / "run_two_ranks"
    shutil.copytree(step_dir(run_dir, 10), step_dir(other, 10))
    meta_path = step_dir(other, 10) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["num_ranks"] = 2  # as if saved by a 2-process run
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    with pytest.raises(CheckpointError, match="state for 2 ranks, this run has 1"):
        train(tiny_config(workspace, "run_two_ranks", resume=True, eval_every=0, sample_every=0))


def test_fp8_without_cuda_is_a_clear_error(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    with pytest.raises(ValueError, match="fp8 training needs a CUDA device"):
        train(tiny_config(workspace, "run_fp8_cpu", fp8=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_reports_mfu_and_checkpoints(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from nanochat_rs.fp8 import scaled_mm_supported

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    fp8 = scaled_mm_supported("cuda")
    summary = train(tiny_config(workspace, "run_cuda", device_type="cuda", num_iterations=4, eval_every=2,
                                save_every=2, sample_every=0, fp8=fp8))
    assert summary["steps"] == 4 and math.isfinite(summary["final_val_bpb"])
    assert re.search(r"^step 00004/00004 .*\| mfu [\d.]+%", capsys.readouterr().out, flags=re.M)
    assert find_steps(workspace / "run_cuda") == [2, 4]
    model, _, _ = load_model(workspace / "run_cuda", "cuda")
    assert model.get_device().type == "cuda"


# ---- checkpoints are self-contained; faults found by attacking the job -------------------------------


def test_a_copied_checkpoint_loads_on_its_own(full_run: tuple[Path, dict, str], tmp_path: Path) -> None:
    """The tokenizer travels inside the step directory: a copy elsewhere (another machine) loads."""
    run_dir, _, _ = full_run
    meta = json.loads((step_dir(run_dir, 20) / META_FILE).read_text())
    assert meta["tokenizer_dir"] == "tokenizer" and meta["format_version"] == 2
    copy = tmp_path / "elsewhere"
    shutil.copytree(step_dir(run_dir, 20), step_dir(copy, 20))
    model, tokenizer, _ = load_model(copy, "cpu")
    want_model, want_tokenizer, _ = load_model(run_dir, "cpu")
    ids = want_tokenizer.encode("the quick brown fox", prepend="<|bos|>")
    assert tokenizer.encode("the quick brown fox", prepend="<|bos|>") == ids
    assert torch.equal(model(torch.tensor([ids])), want_model(torch.tensor([ids])))


def test_training_falls_back_to_eager_where_compile_is_unavailable(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    monkeypatch.setattr(training, "compile_available", lambda device: "CppCompileError: no compiler")
    summary = train(tiny_config(workspace, "run_no_compiler", compile=True, num_iterations=2, eval_every=0,
                                sample_every=0, save_every=0))
    out = capsys.readouterr().out
    assert summary["steps"] == 2
    assert "Note: torch.compile is unavailable here (CppCompileError: no compiler); training eagerly" in out
    assert "| eager |" in out


@pytest.mark.parametrize("overrides", [dict(depth=1000), dict(sequence_len=10**9), dict(device_batch_size=10**9)])
def test_a_model_or_batch_too_big_for_memory_is_refused_before_allocating(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    config = tiny_config(workspace, "run_huge", num_iterations=1, **overrides)
    config = replace(config, total_batch_size=config.device_batch_size * config.sequence_len)  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"needs at least [\d,.]+ [KMGT]?B on cpu, but only [\d,.]+ [KMGT]?B is free"):
        train(config)
    assert not find_steps(workspace / "run_huge")


def test_an_unwritable_checkpoint_directory_is_reported_before_training(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    blocker = workspace / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write checkpoints to .*a_file/run"):
        train(tiny_config(workspace, "a_file/run"))
    assert "step 00001" not in capsys.readouterr().out  # refused before the first step


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
        workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanochat_rs import checkpoint

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(workspace / "base"))
    real_write = checkpoint.atomic_write

    def disk_full_at_step_4(path: Path, write, mode: str = "wb") -> None:  # noqa: ANN001
        if "step_000004" in str(path) and path.name == "model.pt":
            raise OSError(28, "No space left on device", str(path))
        real_write(path, write, mode)

    monkeypatch.setattr(checkpoint, "atomic_write", disk_full_at_step_4)
    with pytest.raises(OSError, match="saving checkpoint step 4 .* failed \\(No space left on device\\); nothing "
                                      "earlier was touched: the newest complete checkpoint is step 2"):
        train(tiny_config(workspace, "run_disk_full", num_iterations=4, save_every=2, eval_every=0, sample_every=0))
    assert find_steps(workspace / "run_disk_full") == [2]
    load_model(workspace / "run_disk_full", "cpu")  # the previous checkpoint is intact


def test_train_job_errors_are_one_line(workspace: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), NANOCHAT_BASE_DIR=str(workspace / "base"))
    base = [sys.executable, "-m", "nanochat_rs.train", "--device-type", "cpu", "--no-compile",
            "--tokenizer-dir", str(workspace / "tokenizer"), "--data-dir", str(workspace / "data")]
    cases = [(["--target-param-data-ratio", "inf"], 2, "target_param_data_ratio must be a finite number"),
             (["--target-param-data-ratio", "nan"], 2, "target_param_data_ratio must be a finite number"),
             (["--warmdown-ratio", "3"], 2, "warmdown_ratio must be a finite number in [0.0, 1.0], got 3.0"),
             (["--warmup-steps", "-3"], 2, "warmup_steps must be >= 0, got -3"),
             (["--depth", "1000"], 1, "needs at least")]  # a machine limit, not a usage error
    for args, code, message in cases:
        out = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == code, (args, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr


def test_shards_whose_text_column_is_not_strings_are_a_one_line_error(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "numbers"
    data.mkdir()
    for shard in range(2):
        pq.write_table(pa.table({"text": list(range(50))}), data / f"shard_{shard:05d}.parquet")
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), NANOCHAT_BASE_DIR=str(workspace / "base"))
    out = subprocess.run([sys.executable, "-m", "nanochat_rs.train", "--device-type", "cpu", "--no-compile",
                          "--tokenizer-dir", str(workspace / "tokenizer"), "--data-dir", str(data),
                          "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().endswith("the 'text' column must hold strings, got type int64"), out.stderr
