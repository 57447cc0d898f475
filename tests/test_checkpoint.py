"""Spec for checkpoint.py: atomic, validated save/load of model, per-rank optimizer and metadata."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from nanochat_rs import gpt
from nanochat_rs.checkpoint import (
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    find_last_step,
    find_steps,
    load_checkpoint,
    load_model,
    loader_filename,
    optim_filename,
    save_checkpoint,
    step_dir,
    tokenizer_fingerprint,
)
from nanochat_rs.tokenizer import Tokenizer


@dataclass
class TinyConfig:
    width: int = 4


class Tiny(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = TinyConfig()
        self.lin = torch.nn.Linear(4, 4, dtype=dtype)
        self.emb = torch.nn.Embedding(8, 4, dtype=dtype)


def trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An optimizer with real state (one AdamW step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss = model.lin(model.emb(torch.tensor([1, 2, 3])).float().to(model.lin.weight.dtype)).float().sum()
    loss.backward()
    opt.step()
    return opt


META = {"dataloader_state": {"shard": 1, "row_group": 3}, "tokenizer_dir": "/nowhere", "extra": [1, 2]}


def test_round_trip(tmp_path: Path) -> None:
    model = Tiny()
    opt = trained(model)
    path = save_checkpoint(tmp_path, 20, model, opt, META)
    assert path == step_dir(tmp_path, 20)
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, META_FILE, optim_filename(0),
                                                             loader_filename(0)])
    model_state, optim_state, meta = load_checkpoint(tmp_path)
    assert model_state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(model_state[key], value)
    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_opt.load_state_dict(optim_state)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert meta["step"] == 20 and meta["format_version"] == FORMAT_VERSION
    assert meta["model_config"] == {"width": 4}  # taken from model.config when the caller omits it
    assert meta["dataloader_state"] == META["dataloader_state"] and meta["extra"] == [1, 2]


def test_model_is_saved_in_fp32(tmp_path: Path) -> None:
    model = Tiny(torch.bfloat16)
    save_checkpoint(tmp_path, 1, model, None, META)
    model_state, optim_state, _ = load_checkpoint(tmp_path, load_optimizer=False)
    assert optim_state is None
    assert all(v.dtype == torch.float32 for v in model_state.values())
    assert torch.equal(model_state["lin.weight"], model.lin.weight.float())


def test_compiled_module_prefix_is_stripped(tmp_path: Path) -> None:
    class Wrapped(torch.nn.Module):  # what torch.compile's OptimizedModule looks like to state_dict()
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = Tiny()
            self.config = self._orig_mod.config

    save_checkpoint(tmp_path, 1, Wrapped(), None, META)
    model_state, _, _ = load_checkpoint(tmp_path, load_optimizer=False)
    assert set(model_state) == set(Tiny().state_dict())


def test_last_step_ignores_incomplete_checkpoints(tmp_path: Path) -> None:
    model = Tiny()
    for step in (5, 10, 100):
        save_checkpoint(tmp_path, step, model, None, META)
    (step_dir(tmp_path, 100) / META_FILE).unlink()  # a save that never finished
    step_dir(tmp_path, 200).mkdir()
    assert find_steps(tmp_path) == [5, 10]
    assert find_last_step(tmp_path) == 10
    assert load_checkpoint(tmp_path, load_optimizer=False)[2]["step"] == 10


def test_resaving_a_step_hides_it_until_complete(tmp_path: Path) -> None:
    model = Tiny()
    save_checkpoint(tmp_path, 7, model, None, META)

    class Exploding(Tiny):
        def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 7, Exploding(), None, META)
    assert find_steps(tmp_path) == []  # the old marker went first, so no half-new checkpoint is trusted
    assert not [p for p in step_dir(tmp_path, 7).iterdir() if p.name.endswith(".tmp")]


def test_bad_meta_is_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, Tiny(), None, dict(META, bad=object()))
    with pytest.raises(ValueError, match="missing required keys.*dataloader_state"):
        save_checkpoint(tmp_path, 1, Tiny(), None, {"tokenizer_dir": "x"})
    with pytest.raises(ValueError, match="step must be"):
        save_checkpoint(tmp_path, -1, Tiny(), None, META)
    assert not step_dir(tmp_path, 1).exists()


def test_missing_directory_or_step(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 3, Tiny(), None, META)
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[3\]"):
        load_checkpoint(tmp_path, step=4)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = Tiny()
    save_checkpoint(tmp_path, 9, model, trained(model), META)
    return step_dir(tmp_path, 9)


def test_truncated_model_file(saved: Path) -> None:
    data = (saved / MODEL_FILE).read_bytes()
    (saved / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated model file"):
        load_checkpoint(saved.parent)


def test_truncated_optimizer_file(saved: Path) -> None:
    (saved / optim_filename(0)).write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated optimizer file"):
        load_checkpoint(saved.parent)
    # the model alone is still loadable
    assert load_checkpoint(saved.parent, load_optimizer=False)[0]


def test_damaged_or_missing_dataloader_state(saved: Path) -> None:
    (saved / loader_filename(0)).write_text('{"shard": 1, "row_')
    with pytest.raises(CheckpointError, match="corrupt dataloader state"):
        load_checkpoint(saved.parent)
    (saved / loader_filename(0)).unlink()
    with pytest.raises(CheckpointError, match="incomplete: dataloader state file"):
        load_checkpoint(saved.parent)
    assert load_checkpoint(saved.parent, load_optimizer=False)[0]  # inference does not need it


def test_missing_files(saved: Path) -> None:
    (saved / optim_filename(0)).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(saved.parent)
    (saved / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(saved.parent, load_optimizer=False)


@pytest.mark.parametrize("mutate, message", [
    (lambda text: text[: len(text) // 2], "corrupt checkpoint metadata"),
    (lambda text: "[1, 2]", "not a nanochat_rs checkpoint"),
    (lambda text: json.dumps(dict(json.loads(text), format_version=FORMAT_VERSION + 1)), "format version"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "model_config"}),
     "missing required keys.*model_config"),
    (lambda text: json.dumps(dict(json.loads(text), step="6")), "'step' must be a non-negative integer, got '6'"),
    (lambda text: json.dumps(dict(json.loads(text), tokenizer_dir=7)), "'tokenizer_dir' must be a path string"),
])
def test_bad_meta_json(saved: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    meta_path = saved / META_FILE
    meta_path.write_text(mutate(meta_path.read_text()))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved.parent)


def test_optimizer_requested_but_not_saved(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, Tiny(), None, META)
    with pytest.raises(CheckpointError, match="without optimizer state"):
        load_checkpoint(tmp_path)


def test_world_size_must_match_for_optimizer_state(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CheckpointError, match="optimizer state for 1 ranks, this run has 2"):
        load_checkpoint(saved.parent)


def test_per_rank_optimizer_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r writes (and later reads) optim_rank{r}.pt; only rank 0 writes model and meta."""
    model = Tiny()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    save_checkpoint(tmp_path, 4, model, trained(model), dict(META, dataloader_state="rank 1's"), rank=1)
    assert sorted(p.name for p in step_dir(tmp_path, 4).iterdir()) == [loader_filename(1), optim_filename(1)]
    save_checkpoint(tmp_path, 4, model, trained(model), META, rank=0)
    _, optim_state, meta = load_checkpoint(tmp_path)  # as rank 1 of 2
    assert meta["num_ranks"] == 2 and optim_state is not None
    assert meta["dataloader_state"] == "rank 1's"
    assert "dataloader_state" not in load_checkpoint(tmp_path, load_optimizer=False)[2]


# ---- load_model: a real GPT and tokenizer ------------------------------------------------------------


def test_load_model_rebuilds_an_identical_model(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tokenizer = Tokenizer.train(["hello world, checkpoints are fun! 123"] * 20, vocab_size=256 + 9 + 20)
    tokenizer.save(tok_dir)
    config = gpt.GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                           n_embd=64)
    model = gpt.build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():  # init zeroes some projections: make every weight matter
            p.add_(0.01 * torch.randn_like(p))
    meta = {"dataloader_state": None, "tokenizer_dir": str(tok_dir),
            "tokenizer_id": tokenizer_fingerprint(tok_dir)}
    save_checkpoint(tmp_path / "ckpt", 12, model, None, meta)

    loaded, loaded_tok, loaded_meta = load_model(tmp_path / "ckpt", "cpu")
    assert not loaded.training and loaded_meta["step"] == 12
    assert loaded_tok.vocab_size == tokenizer.vocab_size
    idx = torch.tensor([tokenizer.encode("hello world", prepend="<|bos|>")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))

    (tok_dir / "extra.txt").write_text("the tokenizer directory changed")
    with pytest.raises(CheckpointError, match="not the one this model was trained with"):
        load_model(tmp_path / "ckpt", "cpu")


def test_a_save_cleans_the_temp_files_a_killed_save_left(tmp_path: Path) -> None:
    model = Tiny()
    target = save_checkpoint(tmp_path, 3, model, None, META)
    stale = target / f".{MODEL_FILE}.0123456789abcdef.tmp"  # atomic_write's temp name, left by kill -9
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, 3, model, None, META)
    assert not stale.exists()


def test_resuming_cleans_the_temp_files_a_killed_save_left(saved: Path) -> None:
    stale = saved / f".{optim_filename(0)}.0123456789abcdef.tmp"
    stale.write_bytes(b"half an optimizer state")
    load_checkpoint(saved.parent)  # resume: load_optimizer=True
    assert not stale.exists()


def tiny_gpt_checkpoint(root: Path, **config_overrides: int) -> tuple[Path, gpt.GPT, Tokenizer]:
    tokenizer = Tokenizer.train(["hello world, checkpoints are fun! 123"] * 20, vocab_size=256 + 9 + 20)
    config = gpt.GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                           n_embd=64)
    model = gpt.build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(root, 5, model, None, {"dataloader_state": None}, tokenizer=tokenizer)
    return root, model.eval(), tokenizer


def test_the_tokenizer_travels_inside_the_step_directory(tmp_path: Path) -> None:
    root, model, tokenizer = tiny_gpt_checkpoint(tmp_path / "ckpt")
    assert (step_dir(root, 5) / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((step_dir(root, 5) / META_FILE).read_text())["tokenizer_dir"] == "tokenizer"
    moved = tmp_path / "moved"
    moved.mkdir()
    step_dir(root, 5).rename(moved / "step_000005")  # the original place is gone
    loaded, loaded_tok, _ = load_model(moved, "cpu")
    idx = torch.tensor([tokenizer.encode("hello", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_a_format_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Format 1: absolute tokenizer path and 0-d smear/backout scalars."""
    root, model, tokenizer = tiny_gpt_checkpoint(tmp_path / "ckpt")
    target = step_dir(root, 5)
    tokenizer.save(tmp_path / "abs_tok")
    meta = json.loads((target / META_FILE).read_text())
    meta.update(format_version=1, tokenizer_dir=str(tmp_path / "abs_tok"))
    meta.pop("tokenizer_id")
    (target / META_FILE).write_text(json.dumps(meta))
    state = torch.load(target / MODEL_FILE)
    state["smear_lambda"] = state["smear_lambda"].reshape(())
    state["backout_lambda"] = state["backout_lambda"].reshape(())
    torch.save(state, target / MODEL_FILE)
    shutil.rmtree(target / "tokenizer")
    loaded, _, _ = load_model(root, "cpu")
    assert loaded.smear_lambda.shape == (1,)
    idx = torch.tensor([tokenizer.encode("hello", prepend="<|bos|>")])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_a_checkpoint_asking_for_a_huge_model_is_refused_before_allocating(tmp_path: Path) -> None:
    root, _, _ = tiny_gpt_checkpoint(tmp_path / "ckpt")
    meta_path = step_dir(root, 5) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["model_config"].update(n_layer=4000, n_embd=16384, n_head=128, n_kv_head=128)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="needs at least .* but only .* is free"):
        load_model(root, "cpu")
