"""Convert checkpoints between nanochat's layout and this project's: `nanochat-convert`.

    nanochat-convert --from-nanochat ~/.cache/nanochat/base_checkpoints/d12
    nanochat-convert --to-nanochat $NANOCHAT_BASE_DIR/base_checkpoints/d12 --output DIR

nanochat keeps every saved step of a model side by side in one directory, and one tokenizer per
base directory:

    <nanochat base>/base_checkpoints/d12/model_000500.pt         state dict (torch.save)
    <nanochat base>/base_checkpoints/d12/meta_000500.json        {"step", "model_config", ...}
    <nanochat base>/base_checkpoints/d12/optim_000500_rank0.pt   optimizer shard of each rank
    <nanochat base>/tokenizer/tokenizer.pkl     a pickled tiktoken.Encoding: ranks 0..n-1, specials n..n+8
    <nanochat base>/tokenizer/token_bytes.pt    byte length of every token id (0 for special tokens)

Both GPTs have the same architecture, state-dict names and shapes, so a conversion renames files,
strips torch.compile's key prefix and stores every tensor in fp32 (lossless: nanochat's bf16
embeddings widen exactly). Optimizer state is not converted (the optimizers differ in their state
layout): a converted checkpoint serves chat, evaluation and fine-tuning, which starts a fresh
optimizer, but cannot resume the interrupted run.

nanochat's tokenizer is a pickle, and unpickling can run arbitrary code: it is read by an unpickler
that resolves the one global such a pickle names and nothing else, into an inert stand-in (so not
even tiktoken's own constructor runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanochat_rs import cli
from nanochat_rs.errors import CheckpointError
from nanochat_rs.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanochat_rs.util import atomic_write, read_json

# Modules that import torch are imported inside functions, as in the other jobs: `--help` answers
# at once, and a Ctrl-C while torch loads ends as quietly as one later on.
if TYPE_CHECKING:
    import torch

    from nanochat_rs.gpt import GPTConfig

__all__ = ["default_output", "from_nanochat", "load_nanochat_tokenizer", "main", "read_tiktoken_pickle",
           "save_nanochat_tokenizer", "to_nanochat"]

TOKENIZER_PICKLE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
_MODEL_FILE = re.compile(r"^model_(\d{6,})\.pt$")
_COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper adds it to every key of a compiled model
# nanochat's chat models (SFT, RL) land beside this project's chat models, everything else with base models
_CHAT_PARENTS = ("chatsft_checkpoints", "chatrl_checkpoints", "chat_checkpoints")


def _model_name(step: int) -> str:
    return f"model_{step:06d}.pt"


def _meta_name(step: int) -> str:
    return f"meta_{step:06d}.json"


def _check_step(step: object) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    if step is not None and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---- tokenizer ----------------------------------------------------------------------------------


class _PickledEncoding:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the pickled state, runs nothing."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Resolves only the global that `pickle.dump(tiktoken.Encoding(...))` references (protocols 3-5,
    pickle's default): the class itself. Any other global is a pickle that wants to run something."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _PickledEncoding
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a tiktoken Encoding never does "
                                     "(refusing to load a pickle that could run code)")


def read_tiktoken_pickle(path: str | os.PathLike[str]) -> tuple[str, dict[bytes, int], dict[str, int]]:
    """(pat_str, mergeable_ranks, special_tokens) of a pickled tiktoken.Encoding, read without running
    any code from the file. A pickle of anything else is a CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no nanochat tokenizer: {path} does not exist") from None
    try:
        obj = _EncodingUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a damaged pickle raises about anything: EOFError, KeyError, TypeError, ...
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(obj, _PickledEncoding):
        raise CheckpointError(f"{path} does not hold a tiktoken Encoding (it holds a {type(obj).__name__})")
    state = obj.state
    if isinstance(state, str):  # tiktoken pickles its registered encodings by name
        raise CheckpointError(f"{path} names tiktoken's built-in encoding {state!r}, not a trained nanochat tokenizer")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a tiktoken Encoding without its state")
    pattern, ranks, specials = state.get("pat_str"), state.get("mergeable_ranks"), state.get("special_tokens")
    if not isinstance(pattern, str):
        raise CheckpointError(f"{path}: the Encoding has no split pattern (pat_str)")
    if not isinstance(ranks, dict) or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
        raise CheckpointError(f"{path}: mergeable_ranks must map token bytes to int ranks")
    if not isinstance(specials, dict) or not all(isinstance(k, str) and type(v) is int for k, v in specials.items()):
        raise CheckpointError(f"{path}: special_tokens must map names to int ids")
    return pattern, ranks, specials


def load_nanochat_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of nanochat's tokenizer directory (its tokenizer.pkl; token_bytes.pt is derived
    data, recomputed from the ranks when needed)."""
    path = Path(directory) / TOKENIZER_PICKLE
    pattern, ranks, specials = read_tiktoken_pickle(path)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise CheckpointError(f"{path}: the mergeable ranks are not exactly 0..{n - 1}")
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        got = ", ".join(f"{name}={i}" for name, i in sorted(specials.items(), key=lambda item: item[1]))
        raise CheckpointError(f"{path} has special tokens [{got}]; expected nanochat's {len(SPECIAL_TOKENS)} "
                              f"in order from id {n}: {', '.join(SPECIAL_TOKENS)}")
    vocab = sorted(ranks, key=ranks.__getitem__)
    try:
        return Tokenizer(vocab, pattern)
    except ValueError as e:  # the Rust encoder checks the byte tokens, duplicates and the pattern
        raise CheckpointError(f"{path}: {e}") from None


def save_nanochat_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike[str]) -> Path:
    """Write `tokenizer` as nanochat's tokenizer directory (tokenizer.pkl + token_bytes.pt)."""
    import torch


    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    encoding = tokenizer.to_tiktoken()
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int32)
    atomic_write(path / TOKENIZER_PICKLE, lambda f: pickle.dump(encoding, f))
    atomic_write(path / TOKEN_BYTES_FILE, lambda f: torch.save(token_bytes, f))
    return path


# ---- model --------------------------------------------------------------------------------------


def _model_config(model_config: Any, where: Path) -> GPTConfig:
    """GPTConfig of nanochat's model_config, which must name exactly the fields of ours: a key we lack
    would be an architecture option this project's GPT cannot reproduce."""
    from nanochat_rs.checkpoint import model_config_from_meta
    from nanochat_rs.gpt import GPTConfig

    if not isinstance(model_config, dict):
        raise CheckpointError(f"{where} has no model_config object")
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    missing = [k for k in fields if k not in model_config]
    unknown = [k for k in model_config if k not in fields]
    if missing:
        raise CheckpointError(f"{where}: model_config lacks {missing}")
    if unknown:
        raise CheckpointError(f"{where}: model_config has settings this project's GPT does not have: {unknown}")
    return model_config_from_meta(model_config)


def _check_state(state: dict[str, torch.Tensor], config: GPTConfig, where: Path) -> None:
    """Raise CheckpointError naming the first tensor that a GPT of `config` lacks, has in another shape,
    or does not have."""
    import torch

    from nanochat_rs.gpt import GPT

    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {key: tuple(value.shape) for key, value in GPT(config).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{where} has no tensor {key!r}, which the model_config needs")
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: {key} has shape {got}, the model_config needs {shape}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise CheckpointError(f"{where} has tensor {unexpected[0]!r}, which this project's GPT does not have")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = read_json(path, "metadata", CheckpointError)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: every nanochat model_NNNNNN.pt has its meta_NNNNNN.json "
                                "beside it") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return meta


def _load_nanochat_state(path: Path) -> dict[str, torch.Tensor]:
    """nanochat's state dict: torch.compile's prefix stripped, floats in fp32."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for damaged files
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {key.removeprefix(_COMPILE_PREFIX): value.float() if isinstance(value, torch.Tensor)
            and value.is_floating_point() else value for key, value in state.items()}


def _nanochat_steps(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _MODEL_FILE.match(p.name)))


def default_output(source: Path) -> Path:
    """Where --from-nanochat writes without --output: this project's base (or chat) checkpoints, under
    the name of nanochat's model directory (d12 stays d12)."""
    from nanochat_rs.checkpoint import BASE_CHECKPOINTS, CHAT_CHECKPOINTS
    from nanochat_rs.common import base_dir

    source = source.resolve()
    root = CHAT_CHECKPOINTS if source.parent.name in _CHAT_PARENTS else BASE_CHECKPOINTS
    return base_dir() / root / source.name


def from_nanochat(source: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                  step: int | None = None, tokenizer_dir: str | os.PathLike[str] | None = None,
                  force: bool = False) -> Path:
    """Convert step `step` (default: the newest) of nanochat's checkpoint directory `source` into
    `output` (default: `default_output(source)`) and return the step directory written.

    The tokenizer comes from `tokenizer_dir` (default: source/../../tokenizer, nanochat's base_dir/tokenizer)
    and is stored inside the step directory. An existing step is replaced only with `force`.
    """
    import torch

    from nanochat_rs.checkpoint import save_checkpoint, step_dir
    from nanochat_rs.gpt import GPT

    _check_step(step)
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"nanochat checkpoint directory {source} does not exist")
    steps = _nanochat_steps(source)
    if not steps:
        raise CheckpointError(f"no model_NNNNNN.pt in {source}: not a nanochat checkpoint directory")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no {_model_name(step)} in {source} (available steps: {steps})")
    meta_path = source / _meta_name(step)
    nanochat_meta = _read_json(meta_path)
    config = _model_config(nanochat_meta.get("model_config"), meta_path)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else source.resolve().parent.parent / "tokenizer"
    tokenizer = load_nanochat_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, the model "
                              f"{config.vocab_size}: pass the --tokenizer-dir this model was trained with")
    model_path = source / _model_name(step)
    state = _load_nanochat_state(model_path)
    _check_state(state, config, model_path)

    output = Path(output) if output is not None else default_output(source)
    target = step_dir(output, step)
    if target.exists():
        if not force:
            raise FileExistsError(f"{target} already exists: pass --force to replace it")
        shutil.rmtree(target)  # not just overwritten: a trained step's optimizer files would outlive it
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the weights, no copy
    meta = {"dataloader_state": None,
            "converted_from": {"format": "nanochat", "path": str(model_path.resolve()), "step": step}}
    return save_checkpoint(output, step, model, None, meta, tokenizer=tokenizer)


def _tokenizer_to_write(directory: Path, tokenizer: Tokenizer, force: bool) -> bool:
    """Whether to write `tokenizer` into nanochat's tokenizer `directory`: not when the same one is
    already there (converting a second step of a model), never over a different one without `force`."""
    if not (directory / TOKENIZER_PICKLE).exists():
        return True
    if force:
        return True
    try:
        existing = load_nanochat_tokenizer(directory)
        same = existing.pattern == tokenizer.pattern and existing.mergeable_ranks() == tokenizer.mergeable_ranks()
    except ValueError:  # unreadable: certainly not ours
        same = False
    if not same:
        raise FileExistsError(f"{directory} holds a different tokenizer: pass --force to replace it "
                              "(or --tokenizer-output DIR)")
    return False


def to_nanochat(source: str | os.PathLike[str], output: str | os.PathLike[str], *, step: int | None = None,
                tokenizer_output: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Write step `step` (default: the newest) of our checkpoint directory `source` into `output` in
    nanochat's layout (model_NNNNNN.pt + meta_NNNNNN.json) and its tokenizer into `tokenizer_output`
    (default: output/tokenizer); return the model file. Existing files are replaced only with `force`."""
    import torch

    from nanochat_rs.checkpoint import load_checkpoint, load_checkpoint_tokenizer, model_config_from_meta, step_dir

    _check_step(step)
    model_state, _, meta = load_checkpoint(source, step, device="cpu", load_optimizer=False)
    step = meta["step"]
    source_step = step_dir(source, step)
    config = model_config_from_meta(meta["model_config"])
    _check_state(model_state, config, source_step)
    tokenizer = load_checkpoint_tokenizer(source_step, meta, config.vocab_size)

    output = Path(output)
    model_path, meta_path = output / _model_name(step), output / _meta_name(step)
    if not force and (model_path.exists() or meta_path.exists()):
        raise FileExistsError(f"{output} already holds step {step}: pass --force to replace it")
    tokenizer_dir = Path(tokenizer_output) if tokenizer_output is not None else output / "tokenizer"
    write_tokenizer = _tokenizer_to_write(tokenizer_dir, tokenizer, force)
    nanochat_meta = {"step": step, "model_config": dataclasses.asdict(config),
                     "converted_from": {"format": "nanochat_rs", "path": str(source_step.resolve()), "step": step}}
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f"optim_{step:06d}_rank*.pt"):  # nanochat would resume from another model's state
        stale.unlink()
    atomic_write(model_path, lambda f: torch.save(model_state, f))
    atomic_write(meta_path, lambda f: f.write(json.dumps(nanochat_meta, indent=2) + "\n"), mode="w")
    if write_tokenizer:
        save_nanochat_tokenizer(tokenizer, tokenizer_dir)
    return model_path


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nanochat-convert",
        description="Convert a nanochat checkpoint into this project's checkpoint layout, or back. Model "
                    "weights and the tokenizer are converted; optimizer state is not (optim_*.pt files are "
                    "ignored), so a converted checkpoint can chat, be evaluated and be fine-tuned, but not "
                    "resume the run that wrote it.")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-nanochat", type=Path, metavar="CHECKPOINT_DIR",
                           help="nanochat's checkpoint directory holding model_NNNNNN.pt + meta_NNNNNN.json, "
                                "e.g. $NANOCHAT_BASE_DIR/base_checkpoints/d12 of nanochat")
    direction.add_argument("--to-nanochat", type=Path, metavar="CHECKPOINT_DIR",
                           help="our checkpoint directory holding step_NNNNNN/ (needs --output)")
    parser.add_argument("--step", type=int, default=None, help="the step to convert (default: the newest)")
    parser.add_argument("--output", type=Path, default=None,
                        help="--from-nanochat: our checkpoint directory (default: $NANOCHAT_BASE_DIR/"
                             "base_checkpoints/<name of CHECKPOINT_DIR>, or chat_checkpoints/<name> for "
                             "nanochat's chatsft_checkpoints/chatrl_checkpoints); --to-nanochat: the nanochat "
                             "checkpoint directory to write (nanochat looks in <its base>/base_checkpoints/<tag> "
                             "or chatsft_checkpoints/<tag>)")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="--from-nanochat: nanochat's tokenizer directory holding tokenizer.pkl (default: "
                             "CHECKPOINT_DIR/../../tokenizer, i.e. the tokenizer/ of the nanochat base "
                             "directory that holds base_checkpoints/<tag>)")
    parser.add_argument("--tokenizer-output", type=Path, default=None,
                        help="--to-nanochat: where to write tokenizer.pkl + token_bytes.pt (default: "
                             "OUTPUT/tokenizer; nanochat reads them from <its base>/tokenizer)")
    parser.add_argument("--force", action="store_true", help="replace an existing output step (and tokenizer)")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Reject option combinations that mean nothing, before any file is read."""
    if args.step is not None and args.step < 0:
        raise cli.UsageError(f"--step must be >= 0, got {args.step}")
    if args.from_nanochat is not None and args.tokenizer_output is not None:
        raise cli.UsageError("--tokenizer-output goes with --to-nanochat (--from-nanochat stores the tokenizer "
                             "inside the step directory)")
    if args.to_nanochat is not None:
        if args.tokenizer_dir is not None:
            raise cli.UsageError("--tokenizer-dir goes with --from-nanochat (our checkpoints carry their tokenizer)")
        if args.output is None:
            raise cli.UsageError("--to-nanochat needs --output DIR (the nanochat checkpoint directory to write)")


def run(args: argparse.Namespace) -> None:
    check_options(args)
    if args.from_nanochat is not None:
        target = from_nanochat(args.from_nanochat, args.output, step=args.step, tokenizer_dir=args.tokenizer_dir,
                               force=args.force)
        print(f"converted nanochat {args.from_nanochat} -> {target} (weights and tokenizer; optimizer state "
              f"not converted)\nchat with it: nanochat-chat --checkpoint {target.parent}")
    else:
        model_path = to_nanochat(args.to_nanochat, args.output, step=args.step,
                                 tokenizer_output=args.tokenizer_output, force=args.force)
        tokenizer_dir = args.tokenizer_output or args.output / "tokenizer"
        print(f"converted {args.to_nanochat} -> {model_path} and its meta .json, tokenizer in {tokenizer_dir} "
              "(optimizer state not converted)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_job(lambda: run(args))


if __name__ == "__main__":
    main()
