"""Training checkpoints: save, validate, load, and rebuild a model for inference.

Layout, one directory per step::

    <directory>/step_000020/model.pt         fp32 model state (rank 0)
    <directory>/step_000020/optim_rank0.pt   optimizer state of each rank (ZeRO-style shards differ)
    <directory>/step_000020/loader_rank0.json dataloader state of each rank (its stride of the data)
    <directory>/step_000020/meta.json        config, step, tokenizer, format version
    <directory>/step_000020/tokenizer/       the tokenizer the model was trained with

A step directory is self-contained: copied to another machine (alone), it loads there. meta.json
names the tokenizer by a path relative to the step directory (format 1 stored an absolute path,
which still loads where that path exists).

The dataloader state holds the packer's buffered documents (megabytes), so it lives beside the
optimizer shard of its rank rather than in meta.json: inference reads only meta.json and model.pt, and
saving needs no gather across ranks.

Every file is written to a temporary name in the same directory, fsynced and renamed into place, and
meta.json is written last (after all ranks finished their own files), so a step directory with a
meta.json is complete: a crash mid-save can never leave something that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nanochat_rs.common import get_dist_info, is_ddp_initialized
from nanochat_rs.errors import CheckpointError
from nanochat_rs.util import atomic_write, read_json, remove_stale_temp_files

if TYPE_CHECKING:
    from nanochat_rs.gpt import GPT, GPTConfig
    from nanochat_rs.tokenizer import Tokenizer

FORMAT = "nanochat_rs-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: absolute tokenizer path, 0-d smear/backout scalars
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
# Under $NANOCHAT_BASE_DIR: where pretraining and fine-tuning write their runs (one folder per depth).
BASE_CHECKPOINTS = "base_checkpoints"
CHAT_CHECKPOINTS = "chat_checkpoints"
REQUIRED_META_KEYS = ("model_config", "step", "tokenizer_dir")
LOADER_STATE_KEY = "dataloader_state"  # in the meta passed to save / returned by load, not in meta.json
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps modules; checkpoints hold the plain names


def step_dir(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


def optim_filename(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def loader_filename(rank: int) -> str:
    return f"loader_rank{rank}.json"


def find_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Steps with a complete checkpoint (meta.json present), ascending."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file())


def newest_checkpoint_dir(root: str | os.PathLike[str]) -> Path | None:
    """The run directory (one holding step_NNNNNN/ folders) anywhere under `root` whose newest complete
    step was written last; None when `root` holds no complete checkpoint."""
    markers = list(Path(root).glob(f"**/step_*/{META_FILE}"))  # meta.json is written last: complete
    if not markers:
        return None
    return max(markers, key=lambda p: p.stat().st_mtime).parent.parent


def find_last_step(directory: str | os.PathLike[str]) -> int:
    """The newest complete checkpoint step in `directory`; FileNotFoundError when there is none."""
    steps = find_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (step_NNNNNN/{META_FILE}) in {directory}")
    return steps[-1]


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike[str]) -> str:
    """sha256 over the files of a saved tokenizer: identifies the vocabulary a model was trained with."""
    root = Path(tokenizer_dir)
    files = []
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no tokenizer files in {root}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---- writing ----------------------------------------------------------------------------------


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every entry, keyed without torch.compile's prefix."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix(_COMPILE_PREFIX)
        value = value.detach().cpu()
        state[key] = value.float() if value.is_floating_point() else value.clone()
    return state


def _barrier() -> None:
    if is_ddp_initialized():
        dist.barrier()


def _full_meta(step: int, model: torch.nn.Module, meta: dict[str, Any],
               has_optimizer: bool) -> dict[str, Any]:
    full = {k: v for k, v in meta.items() if k != LOADER_STATE_KEY}
    if "model_config" not in full:
        config = getattr(model, "config", None)
        if not is_dataclass(config):
            raise ValueError("meta needs 'model_config' (the model has no dataclass .config to take it from)")
        full["model_config"] = asdict(config)  # type: ignore[arg-type]
    missing = [k for k in (*REQUIRED_META_KEYS, LOADER_STATE_KEY) if k not in meta and k not in full and k != "step"]
    if missing:
        raise ValueError(f"checkpoint meta is missing required keys {missing}")
    full.update(format=FORMAT, format_version=FORMAT_VERSION, step=step, has_optimizer=has_optimizer,
                num_ranks=get_dist_info().world_size)
    try:
        json.dumps(full)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    return full


def save_checkpoint(directory: str | os.PathLike[str], step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any], rank: int = 0,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Save `step` under `directory` and return the step directory. Call it on every rank.

    Rank 0 writes the model, the tokenizer (into `tokenizer/` of the step directory, when given) and
    meta.json; each rank writes its own optimizer state and its own `meta["dataloader_state"]` (so
    each rank passes its own). `meta` must be JSON-serialisable and contain "dataloader_state", and
    "tokenizer_dir" unless `tokenizer` is given ("model_config" is taken from `model.config` when
    absent; "step" and the format fields are filled in here). A failed save (a full disk) leaves the
    previous checkpoints as they were and says which one is the newest complete.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if tokenizer is not None:
        meta = {**meta, "tokenizer_dir": TOKENIZER_SUBDIR}
    full = _full_meta(step, model, meta, optimizer is not None)  # validate before touching the disk
    loader_json = json.dumps(meta[LOADER_STATE_KEY])
    target = step_dir(directory, step)
    try:
        target.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            # Overwriting a step: drop its completeness marker first so a crash can't mix old and new files.
            (target / META_FILE).unlink(missing_ok=True)
            remove_stale_temp_files(target)  # left by a save that was killed
        _barrier()
        if rank == 0:
            state = _plain_state_dict(model)
            atomic_write(target / MODEL_FILE, lambda f: torch.save(state, f))
            if tokenizer is not None:
                tokenizer.save(target / TOKENIZER_SUBDIR)
                full["tokenizer_id"] = tokenizer_fingerprint(target / TOKENIZER_SUBDIR)
        if optimizer is not None:
            optim_state = optimizer.state_dict()
            atomic_write(target / optim_filename(rank), lambda f: torch.save(optim_state, f))
        atomic_write(target / loader_filename(rank), lambda f: f.write(loader_json + "\n"), mode="w")
        _barrier()  # every rank's files are in place before the marker appears
        if rank == 0:
            atomic_write(target / META_FILE, lambda f: f.write(json.dumps(full, indent=2) + "\n"), mode="w")
    except OSError as e:
        previous = [s for s in find_steps(directory) if s != step]
        kept = f"the newest complete checkpoint is step {previous[-1]}" if previous else "no earlier checkpoint exists"
        raise OSError(e.errno, f"saving checkpoint step {step} in {target} failed ({e.strerror or e}); "
                               f"nothing earlier was touched: {kept}") from None
    _barrier()
    return target


# ---- reading ----------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any]:
    meta = read_json(path, "checkpoint metadata", CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanochat_rs checkpoint")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}, "
                              f"this code reads versions {READABLE_VERSIONS}")
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} is missing required keys {missing}")
    if isinstance(meta["step"], bool) or not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"{path}: 'step' must be a non-negative integer, got {meta['step']!r}")
    if not isinstance(meta["tokenizer_dir"], str):
        raise CheckpointError(f"{path}: 'tokenizer_dir' must be a path string, got {meta['tokenizer_dir']!r}")
    return meta


def _upgrade_model_state(state: dict[str, Any], format_version: int) -> dict[str, Any]:
    """Format 1 stored smear_lambda/backout_lambda as 0-d tensors; the model now uses shape (1,)."""
    if format_version == 1:
        for key in ("smear_lambda", "backout_lambda"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state[key] = value.reshape(1)
    return state


def checkpoint_tokenizer_dir(step_directory: Path, meta: dict[str, Any]) -> Path:
    """Where the tokenizer of a checkpoint is: relative to its step directory (or absolute, format 1)."""
    return step_directory / meta["tokenizer_dir"]


def _read_loader_state(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint is incomplete: dataloader state file {path} is missing")
    return read_json(path, "dataloader state", CheckpointError)


def _load_tensor_file(path: Path, device: str | torch.device, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint is incomplete: {what} file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"corrupt or truncated {what} file {path}: {first_line}") from None


def _resolve_step(directory: Path, step: int | None) -> int:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if step is None:
        return find_last_step(directory)
    if not (step_dir(directory, step) / META_FILE).is_file():
        available = find_steps(directory)
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory} "
                                f"(available steps: {available or 'none'})")
    return step


def load_checkpoint(
    directory: str | os.PathLike[str], step: int | None = None, device: str | torch.device = "cpu",
    load_optimizer: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Load (model_state, optimizer_state_of_this_rank | None, meta); `step=None` means the newest.

    `load_optimizer=True` (resuming training) also puts this rank's dataloader state into
    `meta["dataloader_state"]`. Missing directories/steps raise FileNotFoundError; damaged or
    incompatible files CheckpointError.
    """
    root = Path(directory)
    step = _resolve_step(root, step)
    target = step_dir(root, step)
    meta = _read_meta(target / META_FILE)
    model_state = _load_tensor_file(target / MODEL_FILE, device, "model")
    if not isinstance(model_state, dict):
        raise CheckpointError(f"{target / MODEL_FILE} does not hold a state dict")
    model_state = _upgrade_model_state(model_state, meta["format_version"])
    optim_state = None
    if load_optimizer:
        if not meta.get("has_optimizer", False):
            raise CheckpointError(f"checkpoint {target} was saved without optimizer state")
        info = get_dist_info()
        if meta.get("num_ranks") != info.world_size:
            raise CheckpointError(f"checkpoint {target} has optimizer state for {meta.get('num_ranks')} "
                                  f"ranks, this run has {info.world_size} (resume with the same world size)")
        if info.rank == 0:
            remove_stale_temp_files(target)  # left by a save that was killed
        optim_state = _load_tensor_file(target / optim_filename(info.rank), device, "optimizer")
        meta[LOADER_STATE_KEY] = _read_loader_state(target / loader_filename(info.rank))
    return model_state, optim_state, meta


def model_config_from_meta(model_config: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of a saved `model_config` dict (the only place a config is rebuilt from JSON)."""
    from nanochat_rs.gpt import GPTConfig

    if not isinstance(model_config, dict):
        raise CheckpointError(f"checkpoint model_config must be an object, got {type(model_config).__name__}")
    try:
        return GPTConfig(**model_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint model_config is not a valid GPTConfig: {e}") from None


def load_model(directory: str | os.PathLike[str], device: str | torch.device,
               step: int | None = None) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode) and the tokenizer it was trained with."""
    from nanochat_rs.gpt import build_model
    from nanochat_rs.memory import check_fits, inference_memory_bytes

    model_state, _, meta = load_checkpoint(directory, step, device=device, load_optimizer=False)
    config = model_config_from_meta(meta["model_config"])
    check_fits(inference_memory_bytes(config), torch.device(device), f"the checkpoint's model {config}")
    model = build_model(config, device)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model: {str(e).splitlines()[0]}") from None
    model.eval()
    tokenizer = load_checkpoint_tokenizer(step_dir(directory, meta["step"]), meta, model.config.vocab_size)
    return model, tokenizer, meta


def load_checkpoint_tokenizer(step_directory: Path, meta: dict[str, Any], vocab_size: int) -> Tokenizer:
    """The tokenizer stored with a checkpoint step, checked to be the one the model was trained with
    (its fingerprint) and to match the model's vocabulary."""
    from nanochat_rs.tokenizer import Tokenizer

    tokenizer_dir = checkpoint_tokenizer_dir(step_directory, meta)
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        raise CheckpointError(f"checkpoint {step_directory} has no tokenizer: {tokenizer_dir} is missing or empty "
                              f"(a step directory is copied whole, with its {TOKENIZER_SUBDIR}/ folder)")
    expected_id = meta.get("tokenizer_id")
    if expected_id is not None and tokenizer_fingerprint(tokenizer_dir) != expected_id:
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} is not the one this model was trained with "
                              "(its files changed since the checkpoint was written)")
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, "
                              f"the model {vocab_size}")
    return tokenizer
