"""Helper for test_optim's multi-process test (not a test module itself).

As a script, one rank of a gloo run:
    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _dist_worker_optim.py OUT_DIR
Each rank trains `TinyNet` for `STEPS` steps on its slice of the same global batches, once with the
process group's own collectives and once with the all_reduce fallback forced, and writes the final
parameters plus the shapes of its optimizer state to OUT_DIR/rank{r}_{mode}.pt.

As a module, it provides the model, groups and batches for the single-process reference run.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 65  # odd first dim: the lm_head can't be split across 2 ranks and must be all-reduced
DIM = 64
HIDDEN = 128
STEPS = 4
GLOBAL_BATCH = 8
SEQ = 9
MODES = ("native", "fallback")


class TinyNet(nn.Module):
    """Covers every sharding case for 2 ranks: a dim-0-sharded AdamW param (emb, 64x64 = 4096),
    an all-reduced large one (head, 65 rows) and a small one (scale); Muon groups with N = 3 tall
    matrices (uneven split), N = 1 wide matrix (rank 1 owns nothing) and N = 2 square matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(DIM, DIM)
        self.up = nn.ModuleList(nn.Linear(DIM, HIDDEN, bias=False) for _ in range(3))
        self.down = nn.Linear(HIDDEN, DIM, bias=False)
        self.mix = nn.ModuleList(nn.Linear(DIM, DIM, bias=False) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(3))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        h = sum(s * F.relu(up(x)) for s, up in zip(self.scale, self.up, strict=True))
        x = x + self.down(h)
        for mix in self.mix:
            x = x + torch.tanh(mix(x))
        return self.head(x)


def build_model() -> TinyNet:
    torch.manual_seed(1234)
    return TinyNet()


def param_groups(model: TinyNet) -> list[dict[str, Any]]:
    def muon(params: list[nn.Parameter]) -> dict[str, Any]:
        return {"kind": "muon", "params": params, "lr": 0.02, "momentum": 0.9, "ns_steps": 5, "beta2": 0.95,
                "weight_decay": 0.2}

    return [
        {"kind": "adamw", "params": [model.emb.weight], "lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-10,
         "weight_decay": 0.01},
        # eps comparable to the gradients makes this group sensitive to the gradient's scale (Adam and
        # Muon are otherwise scale-invariant), so summing instead of averaging across ranks shows up.
        {"kind": "adamw", "params": [model.head.weight, model.scale], "lr": 0.01, "betas": (0.8, 0.95),
         "eps": 1e-3, "weight_decay": 0.0},
        muon([up.weight for up in model.up]),
        muon([model.down.weight]),
        muon([mix.weight for mix in model.mix]),
    ]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids < DIM (the embedding size) as inputs, < VOCAB as targets."""
    gen = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randint(0, DIM, (GLOBAL_BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    return inputs, targets


def train(model: TinyNet, rank: int, world: int) -> torch.optim.Optimizer:
    """STEPS optimizer steps; rank r sees rows [r*B/w, (r+1)*B/w) of every global batch."""
    from nanochat_rs.optim import MuonAdamW, apply_schedules
    from nanochat_rs.recipe import Schedule

    opt = MuonAdamW(param_groups(model))
    rows = GLOBAL_BATCH // world
    for step in range(STEPS):
        inputs, targets = global_batch(step)
        inputs, targets = inputs[rank * rows:(rank + 1) * rows], targets[rank * rows:(rank + 1) * rows]
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        apply_schedules(opt, step, STEPS, Schedule(warmup_steps=2, warmdown_ratio=0.5))
        opt.step()
        model.zero_grad(set_to_none=True)
    return opt


def state_shapes(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: {k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)}
            for p, s in opt.state.items()}


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    from nanochat_rs import optim
    from nanochat_rs.common import compute_cleanup

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for mode in MODES:
            if mode == "fallback":
                optim._probe_tensor_collectives = lambda device: False
            model = build_model()
            opt = train(model, rank, world)
            torch.save({"params": model.state_dict(), "state_shapes": state_shapes(opt, model),
                        "tensor_collectives": opt._tensor_collectives}, out_dir / f"rank{rank}_{mode}.pt")
    except BaseException:
        compute_cleanup(wait_for_peers=False)
        raise
    compute_cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
