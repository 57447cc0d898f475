"""Process-wide basics: compute dtype, device detection, distributed init, rank-aware printing, paths.

Everything that more than one module needs to agree on lives here, so there is exactly one answer
to "what dtype do activations use" or "where does the project write its files".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_rs.errors import DeviceUnavailableError

_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def _detect_compute_dtype() -> tuple[torch.dtype, str | None]:
    """bf16 on CUDA with SM >= 8.0 (native bf16 tensor cores), fp32 everywhere else; `NANOCHAT_DTYPE`
    overrides the choice (e.g. to force fp32 on a GPU for debugging).

    Returns the dtype and, for an override that names no dtype, the error to raise where the dtype is
    used (raising here would make every `import nanochat_rs.<module>` crash with a traceback).
    """
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        dtype = _DTYPE_NAMES.get(override.strip().lower())
        if dtype is not None:
            return dtype, None
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        detected = torch.bfloat16
    else:
        detected = torch.float32
    if override:
        return detected, f"NANOCHAT_DTYPE={override!r} is not one of {sorted(_DTYPE_NAMES)}"
    return detected, None


# Decided once, at import, so every module sees the same dtype. With a bad NANOCHAT_DTYPE it holds
# the detected dtype and compute_dtype() (which compute_init calls) raises the error instead.
COMPUTE_DTYPE: torch.dtype
COMPUTE_DTYPE, _DTYPE_ERROR = _detect_compute_dtype()


def compute_dtype() -> torch.dtype:
    """The dtype of activations (`COMPUTE_DTYPE`), or a ValueError when NANOCHAT_DTYPE names no dtype."""
    if _DTYPE_ERROR is not None:
        raise ValueError(_DTYPE_ERROR)
    return COMPUTE_DTYPE


def base_dir() -> Path:
    """Root of everything the project writes (data, tokenizer, checkpoints): `NANOCHAT_BASE_DIR`,
    default ~/.cache/nanochat_rs, created when missing."""
    configured = os.environ.get("NANOCHAT_BASE_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "nanochat_rs"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "it exists and is not a directory" if path.exists() else e.strerror
        # one argument, no filename: cli.run_job then prints this message as it is
        default = "" if configured else " (the default)"
        raise OSError(f"NANOCHAT_BASE_DIR={path}{default} is not a usable directory ({reason}); "
                      "point NANOCHAT_BASE_DIR at a writable directory") from None
    return path


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass(frozen=True)
class DistInfo:
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int


def get_dist_info() -> DistInfo:
    """Read torchrun's environment; a plain `python script.py` is rank 0 of 1."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return DistInfo(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                        int(os.environ["WORLD_SIZE"]))
    return DistInfo(False, 0, 0, 1)


def is_ddp_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def print0(*args: object, **kwargs: object) -> None:
    """print() on rank 0 only, so multi-process runs don't repeat every line."""
    if get_dist_info().rank == 0:
        print(*args, **kwargs)  # type: ignore[call-overload]


def compute_init(device_type: str | None = None, seed: int = 42) -> tuple[DistInfo, torch.device]:
    """Seed, pick the device and, under torchrun, initialise the process group.

    NCCL on CUDA, gloo on CPU. Works for 'cuda', 'cpu' and 'mps' alike so scripts can run anywhere.
    """
    compute_dtype()  # a bad NANOCHAT_DTYPE stops the job here, before any work
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device_type must be 'cuda', 'cpu' or 'mps', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device_type='cuda' requested but torch sees no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError("device_type='mps' requested but MPS is not available")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    info = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if info.is_ddp and not is_ddp_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
        dist.barrier()
    return info, device


def compute_cleanup(wait_for_peers: bool = True) -> None:
    """Tear down the process group, if any.

    `wait_for_peers` puts a barrier first, so no rank destroys its transport while a peer is still
    finishing its last collective (gloo then aborts the peer: "terminate called without an active
    exception"). Pass False on an error path, where a failed peer may never reach the barrier.
    """
    if is_ddp_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
