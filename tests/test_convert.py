"""Spec for convert.py: nanochat checkpoints <-> ours.

The nanochat side is written here from nanochat's on-disk format (file names, state-dict names and
dtypes, meta keys, a pickled tiktoken.Encoding), independently of convert.py and of our GPT's own
state dict, so a naming or shape drift on either side fails these tests.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import torch
from model_helpers import build_gpt, random_gpt
from nanochat_rs import convert
from nanochat_rs.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, step_dir
from nanochat_rs.gpt import GPTConfig
from nanochat_rs.tokenizer import SPECIAL_TOKENS, Tokenizer

STEP = 700
TEXTS = ["hello there, how are you? fine thanks. what is two plus two? four.",
         "The quick brown fox jumps over the lazy dog 1234567890 times.",
         "Ünïcödé and emoji 🙂 survive too"]
PROMPT = "hello there, what is"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 20, vocab_size=256 + 9 + 40)


@pytest.fixture(scope="module")
def config(tokenizer: Tokenizer) -> GPTConfig:
    return GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                     n_embd=64, window_pattern="SL")


# ---- nanochat's format, written from its description -------------------------------------------


def nanochat_weights(config: GPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names, shapes and dtypes nanochat's GPT saves on a GPU: embedding rows
    padded to a multiple of 64, value embeddings and their gates on alternating layers counted from the
    last, wte and value embeddings in bf16, everything else fp32."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).to(dtype)

    rows = math.ceil(config.vocab_size / 64) * 64
    dim, layers = config.n_embd, config.n_layer
    kv_dim = config.n_kv_head * dim // config.n_head
    weights = {"transformer.wte.weight": rand(rows, dim, dtype=torch.bfloat16)}
    for i in range(layers):
        attn, mlp = f"transformer.h.{i}.attn.", f"transformer.h.{i}.mlp."
        weights.update({attn + "c_q.weight": rand(dim, dim), attn + "c_k.weight": rand(kv_dim, dim),
                        attn + "c_v.weight": rand(kv_dim, dim), attn + "c_proj.weight": rand(dim, dim),
                        mlp + "c_fc.weight": rand(4 * dim, dim), mlp + "c_proj.weight": rand(dim, 4 * dim)})
        if (layers - 1 - i) % 2 == 0:
            weights[attn + "ve_gate.weight"] = rand(config.n_kv_head, 12)
            weights[f"value_embeds.{i}.weight"] = rand(rows, kv_dim, dtype=torch.bfloat16)
    weights.update({"lm_head.weight": rand(rows, dim), "resid_lambdas": 1 + 0.1 * rand(layers),
                    "x0_lambdas": 0.1 * rand(layers), "smear_gate.weight": rand(1, 24),
                    "smear_lambda": 0.5 * rand(1), "backout_lambda": 0.2 + 0.1 * rand(1)})
    return weights


def nanochat_meta(config: GPTConfig, step: int) -> dict[str, Any]:
    return {"step": step, "val_bpb": 1.25,
            "model_config": {"sequence_len": config.sequence_len, "vocab_size": config.vocab_size,
                             "n_layer": config.n_layer, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
                             "n_embd": config.n_embd, "window_pattern": config.window_pattern},
            "user_config": {"depth": config.n_layer, "run": "dummy"}, "device_batch_size": 4,
            "max_seq_len": config.sequence_len, "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3},
            "loop_state": {"min_val_bpb": 1.2, "smooth_train_loss": 3.4, "total_training_time": 12.5}}


def write_nanochat_step(directory: Path, step: int, weights: dict[str, torch.Tensor], meta: dict[str, Any],
                        compiled: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "_orig_mod." if compiled else ""
    torch.save({prefix + key: value for key, value in weights.items()}, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    torch.save({"not": "converted"}, directory / f"optim_{step:06d}_rank0.pt")


def nanochat_encoding(tokenizer: Tokenizer, specials: list[str] | None = None) -> tiktoken.Encoding:
    ranks = tokenizer.mergeable_ranks()
    names = list(SPECIAL_TOKENS) if specials is None else specials
    return tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=ranks,
                             special_tokens={name: len(ranks) + i for i, name in enumerate(names)})


def write_nanochat_tokenizer(directory: Path, encoding: tiktoken.Encoding) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.pkl").write_bytes(pickle.dumps(encoding))
    lengths = [len(encoding.decode_single_token_bytes(i)) if i < encoding.n_vocab - len(SPECIAL_TOKENS) else 0
               for i in range(encoding.n_vocab)]
    torch.save(torch.tensor(lengths, dtype=torch.int32), directory / "token_bytes.pt")


@pytest.fixture
def nanochat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer,
             config: GPTConfig) -> Path:
    """A nanochat base directory (tokenizer/ + base_checkpoints/d2 at STEP); NANOCHAT_BASE_DIR is ours."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "ours"))
    base = tmp_path / "nanochat"
    write_nanochat_tokenizer(base / "tokenizer", nanochat_encoding(tokenizer))
    write_nanochat_step(base / "base_checkpoints" / "d2", STEP, nanochat_weights(config), nanochat_meta(config, STEP))
    return base


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of convert.main."""
    try:
        convert.main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def greedy(model: Any, tokens: list[int]) -> list[int]:
    return list(model.generate(tokens, 12, temperature=0.0))


# ---- nanochat -> ours --------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "torch.compile prefix"])
def test_from_nanochat_gives_the_same_model(nanochat: Path, tmp_path: Path, tokenizer: Tokenizer,
                                            config: GPTConfig, compiled: bool,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    weights = nanochat_weights(config)
    source = nanochat / "base_checkpoints" / "d2"
    write_nanochat_step(source, STEP, weights, nanochat_meta(config, STEP), compiled=compiled)
    code, out, err = run_main(["--from-nanochat", str(source)], capsys)
    assert (code, err) == (0, "")
    assert "optimizer state not converted" in out

    ours = tmp_path / "ours" / "base_checkpoints" / "d2"  # the default output
    model, converted_tokenizer, meta = load_model(ours, "cpu")
    assert meta["step"] == STEP and meta["has_optimizer"] is False
    assert meta["converted_from"] == {"format": "nanochat", "step": STEP,
                                      "path": str((source / f"model_{STEP:06d}.pt").resolve())}
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key].float(), value.float()), key

    reference = build_gpt(config)  # the original weights, widened to fp32 the way nanochat does on CPU
    reference.load_state_dict({key: value.float() for key, value in weights.items()})
    reference.eval()
    tokens = converted_tokenizer.encode(PROMPT, prepend="<|bos|>")
    ids = torch.tensor([tokens])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert greedy(model, tokens) == greedy(reference, tokens)


def test_converted_tokenizer_encodes_like_nanochats(nanochat: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--from-nanochat", str(nanochat / "base_checkpoints" / "d2")], capsys)[0] == 0
    _, converted, _ = load_model(Path(os.environ["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / "d2", "cpu")
    encoding = pickle.loads((nanochat / "tokenizer" / "tokenizer.pkl").read_bytes())  # our own trusted file
    for text in [*TEXTS, PROMPT, "unseen words: zebra quixotic ™ 北京", "  spaces\n\nand\ttabs  "]:
        assert converted.encode(text) == encoding.encode_ordinary(text), text
    assert converted.special_tokens() == encoding._special_tokens
    assert converted.vocab_size == encoding.n_vocab


def test_from_nanochat_picks_the_newest_step_or_the_one_asked(nanochat: Path, tmp_path: Path, config: GPTConfig,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = nanochat / "base_checkpoints" / "d2"
    write_nanochat_step(source, 100, nanochat_weights(config, seed=1), nanochat_meta(config, 100))
    out = tmp_path / "out"
    assert run_main(["--from-nanochat", str(source), "--output", str(out)], capsys)[0] == 0
    assert run_main(["--from-nanochat", str(source), "--output", str(out), "--step", "100"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["step_000100", "step_000700"]
    state, _, _ = load_checkpoint(out, 100, load_optimizer=False)
    assert torch.equal(state["lm_head.weight"], nanochat_weights(config, seed=1)["lm_head.weight"])
    code, _, err = run_main(["--from-nanochat", str(source), "--output", str(out), "--step", "5"], capsys)
    assert code == 1 and "available steps: [100, 700]" in err


@pytest.mark.parametrize(("parent", "root"), [("base_checkpoints", "base_checkpoints"),
                                              ("chatsft_checkpoints", "chat_checkpoints"),
                                              ("chat_checkpoints", "chat_checkpoints")])
def test_default_output_follows_the_kind_of_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parent: str,
                                                  root: str) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "ours"))
    assert convert.default_output(tmp_path / "nanochat" / parent / "d20") == tmp_path / "ours" / root / "d20"


def test_refuses_to_overwrite_a_step_without_force(nanochat: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--from-nanochat", str(nanochat / "base_checkpoints" / "d2"), "--output", str(tmp_path / "out")]
    assert run_main(argv, capsys)[0] == 0
    stale = step_dir(tmp_path / "out", STEP) / "optim_rank0.pt"  # as if a training run had saved this step
    stale.write_bytes(b"old")
    code, _, err = run_main(argv, capsys)
    assert code == 1 and "already exists" in err and "--force" in err
    assert run_main([*argv, "--force"], capsys)[0] == 0
    assert not stale.exists()
    load_model(tmp_path / "out", "cpu")


# ---- bad input ---------------------------------------------------------------------------------


def _edit_state(base: Path, edit: Any) -> None:
    path = base / "base_checkpoints" / "d2" / f"model_{STEP:06d}.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _edit_meta(base: Path, edit: Any) -> None:
    path = base / "base_checkpoints" / "d2" / f"meta_{STEP:06d}.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _remove(base: Path, pattern: str) -> None:
    for path in base.glob(pattern):
        path.unlink()


def _replace_tokenizer(base: Path, encoding: tiktoken.Encoding) -> None:
    write_nanochat_tokenizer(base / "tokenizer", encoding)


class _RunsShell:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("touch pwned",)


FROM = ["--from-nanochat", "{base}/base_checkpoints/d2"]
ROTATED_SPECIALS = [*SPECIAL_TOKENS[1:], SPECIAL_TOKENS[0]]

# (how the nanochat fixture is broken, argv, exit code, what the one-line error says)
BAD_INPUTS = {
    "missing directory": (None, ["--from-nanochat", "{base}/base_checkpoints/d9"], 1, "does not exist"),
    "no model file": (lambda base, tok: _remove(base, "base_checkpoints/d2/model_*.pt"), FROM, 1,
                      "no model_NNNNNN.pt"),
    "no meta file": (lambda base, tok: _remove(base, "base_checkpoints/d2/meta_*.json"), FROM, 1,
                     "meta_000700.json is missing"),
    "meta without model_config": (lambda base, tok: _edit_meta(base, lambda m: m.pop("model_config")), FROM, 1,
                                  "no model_config"),
    "unknown architecture option": (lambda base, tok: _edit_meta(base, lambda m: m["model_config"].update(mtp_n=2)),
                                    FROM, 1, "does not have: ['mtp_n']"),
    "missing tensor": (lambda base, tok: _edit_state(base, lambda s: s.pop("lm_head.weight")), FROM, 1,
                       "no tensor 'lm_head.weight'"),
    "wrong shape": (lambda base, tok: _edit_state(base, lambda s: s.update(smear_lambda=torch.tensor(0.5))), FROM, 1,
                    "smear_lambda has shape (), the model_config needs (1,)"),
    "extra tensor": (lambda base, tok: _edit_state(base, lambda s: s.update({"mtp.0.weight": torch.zeros(2)})),
                     FROM, 1, "'mtp.0.weight', which this project's GPT does not have"),
    "other tokenizer": (lambda base, tok: _replace_tokenizer(base, nanochat_encoding(
                            Tokenizer.train(TEXTS, vocab_size=256 + 9 + 7))), FROM, 1, "tokens, the model"),
    "special tokens out of order": (lambda base, tok: _replace_tokenizer(base, nanochat_encoding(
                                        tok, ROTATED_SPECIALS)), FROM, 1, "expected nanochat's 9"),
    "unsafe pickle": (lambda base, tok: (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsShell())),
                      FROM, 1, "could run code"),
    "no tokenizer": (None, [*FROM, "--tokenizer-dir", "{base}/elsewhere"], 1, "no nanochat tokenizer"),
    "to-nanochat without output": (None, ["--to-nanochat", "{base}/base_checkpoints/d2"], 2, "needs --output"),
    "to-nanochat of a nanochat dir": (None, ["--to-nanochat", "{base}/base_checkpoints/d2", "--output", "{base}/x"],
                                      1, "no complete checkpoint"),
    "negative step": (None, [*FROM, "--step", "-1"], 2, "--step must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(case: str, nanochat: Path, tokenizer: Tokenizer, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    breakage, argv, expected_code, message = BAD_INPUTS[case]
    if breakage is not None:
        breakage(nanochat, tokenizer)
    monkeypatch.chdir(tmp_path)  # where the unsafe pickle would create its file
    code, _, err = run_main([arg.format(base=nanochat) for arg in argv], capsys)
    assert code == expected_code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "ours" / "base_checkpoints").exists()  # nothing written


def test_restricted_unpickler_never_runs_the_payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payloads = {
        "reduce": pickle.dumps(_RunsShell()),
        "global opcode": b"cos\nsystem\n(S'touch pwned'\ntR.",
        "builtins.eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch pwned\")'\ntR.",
    }
    for name, data in payloads.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="could run code"):
            convert.read_tiktoken_pickle(path)
    assert not (tmp_path / "pwned").exists()
    assert pickle.loads(payloads["reduce"]) == 0 and (tmp_path / "pwned").exists()  # the payload is real


# ---- ours -> nanochat -> ours ------------------------------------------------------------------


def test_round_trip_through_nanochat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer,
                                     config: GPTConfig, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "ours"))
    model = random_gpt(config)
    save_checkpoint(tmp_path / "ours" / "base_checkpoints" / "d2", 42, model, None, {"dataloader_state": None},
                    tokenizer=tokenizer)
    exported = tmp_path / "nanochat" / "base_checkpoints" / "d2"
    code, _, err = run_main(["--to-nanochat", str(tmp_path / "ours" / "base_checkpoints" / "d2"), "--output",
                             str(exported), "--tokenizer-output", str(tmp_path / "nanochat" / "tokenizer")], capsys)
    assert (code, err) == (0, ""), err
    assert sorted(p.name for p in exported.iterdir()) == ["meta_000042.json", "model_000042.pt"]
    meta = json.loads((exported / "meta_000042.json").read_text())
    assert meta["step"] == 42 and meta["model_config"] == nanochat_meta(config, 42)["model_config"]
    exported_state = torch.load(exported / "model_000042.pt", weights_only=True)
    assert exported_state.keys() == nanochat_weights(config).keys()  # nanochat's names
    encoding = pickle.loads((tmp_path / "nanochat" / "tokenizer" / "tokenizer.pkl").read_bytes())
    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding.encode_ordinary(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    token_bytes = torch.load(tmp_path / "nanochat" / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.tolist() == tokenizer.token_bytes()

    back = tmp_path / "back"
    assert run_main(["--from-nanochat", str(exported), "--output", str(back)], capsys)[0] == 0
    restored, restored_tokenizer, _ = load_model(back, "cpu")
    original = model.state_dict()
    assert restored.state_dict().keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert restored_tokenizer.mergeable_ranks() == tokenizer.mergeable_ranks()
    assert restored_tokenizer.pattern == tokenizer.pattern


def test_to_nanochat_overwrites_only_with_force(tmp_path: Path, tokenizer: Tokenizer, config: GPTConfig,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ours = tmp_path / "ours"
    for step in (1, 2, 3):
        save_checkpoint(ours, step, random_gpt(config, seed=step), None, {"dataloader_state": None},
                        tokenizer=tokenizer)
    out = tmp_path / "nanochat"
    assert run_main(["--to-nanochat", str(ours), "--output", str(out), "--step", "1"], capsys)[0] == 0
    # a second step of the same model reuses the tokenizer already there
    assert run_main(["--to-nanochat", str(ours), "--output", str(out), "--step", "2"], capsys)[0] == 0
    code, _, err = run_main(["--to-nanochat", str(ours), "--output", str(out), "--step", "2"], capsys)
    assert code == 1 and "already holds step 2" in err
    (out / "optim_000002_rank0.pt").write_bytes(b"another model's optimizer")
    write_nanochat_tokenizer(out / "tokenizer", nanochat_encoding(Tokenizer.train(TEXTS, vocab_size=256 + 9 + 3)))
    code, _, err = run_main(["--to-nanochat", str(ours), "--output", str(out)], capsys)
    assert code == 1 and "different tokenizer" in err
    assert sorted(p.name for p in out.glob("*_000003*")) == []
    assert run_main(["--to-nanochat", str(ours), "--output", str(out), "--step", "2", "--force"], capsys)[0] == 0
    assert not (out / "optim_000002_rank0.pt").exists()
    assert convert.load_nanochat_tokenizer(out / "tokenizer").mergeable_ranks() == tokenizer.mergeable_ranks()


@pytest.mark.parametrize(("step", "error"), [("7", TypeError), (True, TypeError), (-1, ValueError)])
def test_api_rejects_a_bad_step(tmp_path: Path, step: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="step"):
        convert.from_nanochat(tmp_path, step=step)
    with pytest.raises(error, match="step"):
        convert.to_nanochat(tmp_path, tmp_path / "out", step=step)
