"""MuonAdamW: Muon (MuonEq + Polar Express + Muon+ + NorMuon) for the block matrices, AdamW for the rest.

One optimizer object owns both kinds of parameter group so that a training step is a single
`optimizer.step()`, and so that the distributed gradient reduction (which lives here: there is no DDP
wrapper) can overlap communication of later groups with the update of earlier ones.

Group dicts carry nanochat's keys, all required (the values live in `nanochat_rs.recipe`):
    adamw: {"kind": "adamw", "params", "lr", "betas", "eps", "weight_decay"}
    muon:  {"kind": "muon", "params", "lr", "momentum", "ns_steps", "beta2", "weight_decay"}
Every group also gets "initial_lr" and "initial_weight_decay", which `apply_schedules` multiplies.

Muon step, per group (all params share one (rows, cols) shape and are stacked to (N, rows, cols)):
    1. Nesterov momentum:  buf <- lerp(buf, g, 1 - mu);  u <- lerp(g, buf, mu)
    2. MuonEq:             every row rescaled to the mean row norm (better-conditioned spectrum)
    3. Polar Express:      u <- approx. polar factor of u (5 quintic iterations), in bf16 only when
                           the run computes in bf16
    4. Muon+:              u rescaled to Frobenius norm sqrt(min(rows, cols)), the norm of an exactly
                           semi-orthogonal matrix (corrects the iteration's under-convergence)
    5. NorMuon:            per-row (rows >= cols) or per-column second-moment EMA of u normalises u,
                           then u is rescaled back to its own Frobenius norm
    6. Cautious decay:     p <- p - lr' * u - lr' * wd * p * [u * p >= 0],  lr' = lr * sqrt(max(1, rows/cols))
The decay only touches coordinates where the update already pushes the weight toward zero, so it
never fights the gradient direction. `compiled_step=True` runs each update as one torch.compile'd
graph (as nanochat does); the eager path computes the same function.

Distributed (torch.distributed initialised, world size > 1), ZeRO-2 style: gradients are reduced by
reduce-scatter so each rank receives the averaged gradient of only the shard it owns, keeps optimizer
state for that shard only, updates it, and all-gathers the updated parameters. Single-process runs
make no communication calls at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from nanochat_rs import common
from nanochat_rs.recipe import (
    DEFAULT_SCHEDULE,
    DEFAULT_SFT_SCHEDULE,
    Schedule,
    SFTSchedule,
    lr_multiplier,
    muon_momentum,
    sft_muon_momentum,
    weight_decay_multiplier,
)
from nanochat_rs.util import check_number

# Polar Express (Amsel, Persson, Musco, Gower, arXiv:2505.16932): per-iteration odd quintic
# p(x) = a x + b x^3 + c x^5, chosen greedily to be minimax-optimal for sign(x) on the current
# singular-value interval. These are the 5-iteration coefficients of the paper's public reference
# implementation (lower bound l0 = 1e-3, safety-adjusted), as also used by modded-nanogpt/nanochat.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Dividing by ||X||_F bounds every singular value by 1; the extra 1 % keeps bf16 rounding from
# pushing the top singular value past the interval the coefficients were optimised for.
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_EPS = 1e-6
NORM_EPS = 1e-6  # floor of the row / Frobenius norms MuonEq and Muon+ divide by
NORMUON_EPS = 1e-10
# AdamW parameters smaller than this are all-reduced and updated redundantly on every rank: sharding
# them would cost a collective launch each for no memory saved worth having.
MIN_SHARD_NUMEL = 4096

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")


# ----------------------------------------------------------------------------------------------
# Muon building blocks (pure tensor functions, testable on their own)


def orthogonalization_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """dtype for the Polar Express iteration: bf16 only when the run computes in bf16.

    bf16 is a pure speed win on GPUs with bf16 tensor cores; fp16 overflows in the iteration (its
    exponent range is too small) and fp32-only platforms gain nothing from a cast, so every other
    configuration iterates in the parameter/gradient dtype. Reads `common.compute_dtype()` at call
    time so the choice follows the process-wide setting.
    """
    return torch.bfloat16 if common.compute_dtype() == torch.bfloat16 else param_dtype


def muon_eq(X: torch.Tensor) -> torch.Tensor:
    """MuonEq row equilibration: every row rescaled to the mean row norm ||X||_F / sqrt(rows).

    Norms are taken in fp32 (or wider) whatever X's dtype; the result keeps X's dtype.
    """
    X32 = X.to(_math_dtype(X.dtype))
    target = X32.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    row_norm = X32.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return X * (target / row_norm).to(X.dtype)


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the polar factor U V^T of G = U S V^T (batched over leading dims), in `dtype`.

    Each iteration multiplies by the small Gram matrix: X^T X for tall matrices, X X^T for wide ones.
    """
    if G.dim() < 2:
        raise ValueError(f"polar_express needs a matrix (or a batch of them), got shape {tuple(G.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be in [1, {len(POLAR_EXPRESS_COEFFS)}], got {steps}")
    X = G.to(dtype or G.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + POLAR_EXPRESS_EPS)
    if X.size(-2) > X.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


def muon_plus(update: torch.Tensor) -> torch.Tensor:
    """Muon+: rescale each matrix to Frobenius norm sqrt(min(rows, cols)) (fp32 norms)."""
    target = min(update.size(-2), update.size(-1)) ** 0.5
    norm = update.to(_math_dtype(update.dtype)).norm(dim=(-2, -1), keepdim=True).clamp_min(NORM_EPS)
    return update * (target / norm).to(update.dtype)


def normuon_reduce_dim(rows: int, cols: int) -> int:
    """Dim NorMuon averages over: per-row statistics when rows >= cols, else per-column.

    The orthogonalised update has unit-norm vectors along its short side; its long side is where
    magnitudes differ and need equalising.
    """
    return -1 if rows >= cols else -2


def normuon_state_shape(n: int, rows: int, cols: int) -> tuple[int, int, int]:
    return (n, rows, 1) if normuon_reduce_dim(rows, cols) == -1 else (n, 1, cols)


def normuon(update: torch.Tensor, second_moment: torch.Tensor, beta2: float | torch.Tensor) -> torch.Tensor:
    """NorMuon variance reduction on a stacked (N, rows, cols) update; updates `second_moment` in place.

    No bias correction is needed: the final rescale to the update's own norm cancels any uniform
    factor in the second moment, which is exactly what bias correction would be. beta2 = 1 freezes
    the (zero) second moment, which makes the step a uniform scale that the rescale then cancels.
    """
    dim = normuon_reduce_dim(update.size(-2), update.size(-1))
    reduced = update.size(dim)
    v_mean = update.to(_math_dtype(update.dtype)).square().mean(dim=dim, keepdim=True)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * reduced).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2)
    step_size = second_moment.clamp_min(NORMUON_EPS).rsqrt()
    norm_after = ((v_mean * reduced) * step_size.to(v_mean.dtype).square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return update * (step_size * (norm_before / norm_after.clamp_min(NORMUON_EPS))).to(update.dtype)


def aspect_ratio_scale(rows: int, cols: int) -> float:
    """Orthogonal updates of tall matrices have a smaller per-entry RMS; their LR is scaled up."""
    return max(1.0, rows / cols) ** 0.5


def cautious_weight_decay_step_(params: torch.Tensor, update: torch.Tensor, lr: float | torch.Tensor,
                                weight_decay: float | torch.Tensor) -> None:
    """p <- p - lr * update - lr * wd * p, the decay only where update and p share a sign (or are 0)."""
    mask = (update * params) >= 0
    params.sub_(lr * update + lr * weight_decay * params * mask)


def muon_update_(params: torch.Tensor, grads: torch.Tensor, momentum_buffer: torch.Tensor,
                 second_moment: torch.Tensor, lr: torch.Tensor, momentum: torch.Tensor, beta2: torch.Tensor,
                 weight_decay: torch.Tensor, ns_steps: int) -> None:
    """One Muon step on stacked (N, rows, cols) params; `grads` is scratch, overwritten.

    Hyperparameters come as 0-D tensors so a compiled version of this function sees new values
    every step without recompiling; `lr` is the effective LR (aspect ratio already applied).
    """
    mu = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    nesterov = grads.lerp_(momentum_buffer, mu)
    update = muon_eq(nesterov.to(orthogonalization_dtype(nesterov.dtype)))
    update = polar_express(update, ns_steps).to(params.dtype)
    update = muon_plus(update)
    update = normuon(update, second_moment, beta2.to(update.dtype))
    cautious_weight_decay_step_(params, update, lr.to(params.dtype), weight_decay.to(params.dtype))


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: torch.Tensor, lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor,
                  eps: torch.Tensor, weight_decay: torch.Tensor) -> None:
    """AdamW with decoupled weight decay (nanochat's operation order); math and state in fp32.

    `param` may be bf16 (embeddings are stored in the compute dtype): it is updated through an fp32
    copy. Hyperparameters are 0-D tensors, as for `muon_update_`.
    """
    param32 = param.to(_math_dtype(param.dtype))
    grad32 = grad.to(param32.dtype)
    param32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad32, 1 - beta1)
    exp_avg_sq.lerp_(grad32.square(), 1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq / bias_correction2).sqrt() + eps
    param32.add_(exp_avg / denom * (-lr / bias_correction1))
    param.copy_(param32)


_COMPILED: dict[str, Callable[..., None]] = {}


def _compiled(name: str, fn: Callable[..., None]) -> Callable[..., None]:
    """torch.compile `fn` once per process (dynamic=False: one graph per shape, like the model)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


# ----------------------------------------------------------------------------------------------
# Communication (only ever used when world size > 1)


def _probe_tensor_collectives(device: torch.device) -> bool:
    """Whether this process group has reduce_scatter_tensor / all_gather_into_tensor.

    gloo lacks them on some torch builds (ProcessGroupGloo raises at call time, identically on every
    rank), so one tiny synchronous probe on the first step decides; without them the optimizer uses
    all_reduce + local slice and list all_gather, which move more bytes but give the same result.
    """
    world = dist.get_world_size()
    try:
        out = torch.zeros(1, device=device)
        dist.reduce_scatter_tensor(out, torch.zeros(world, device=device))
        dist.all_gather_into_tensor(torch.zeros(world, device=device), out)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


class _Pending:
    """An async collective plus the local work that must follow its completion."""

    def __init__(self, work: Any, then: Callable[[], None] | None = None):
        self._work = work
        self._then = then

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._then is not None:
            then, self._then = self._then, None
            then()


class _Comm:
    def __init__(self, rank: int, world: int, tensor_collectives: bool):
        self.rank = rank
        self.world = world
        self.tensor_collectives = tensor_collectives

    def all_reduce_mean(self, tensor: torch.Tensor) -> _Pending:
        # SUM + divide rather than ReduceOp.AVG, which older gloo builds reject.
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: tensor.div_(self.world))

    def reduce_scatter_mean(self, out: torch.Tensor, full: torch.Tensor) -> _Pending:
        """out <- mean over ranks of full.chunk(world)[rank]; `full` may be clobbered."""
        if self.tensor_collectives:
            work = dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, async_op=True)
            return _Pending(work, lambda: out.div_(self.world))
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: torch.div(full.chunk(self.world)[self.rank], self.world, out=out))

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> _Pending:
        if self.tensor_collectives:
            return _Pending(dist.all_gather_into_tensor(full, shard, async_op=True))
        # chunks along dim 0 of a contiguous tensor are contiguous views: gathered in place.
        return _Pending(dist.all_gather(list(full.chunk(self.world)), shard, async_op=True))


def _world() -> tuple[int, int] | None:
    if common.is_ddp_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


# ----------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups of same-shape 2-D matrices, AdamW for the rest; ZeRO-2 sharded under DDP."""

    def __init__(self, param_groups: list[dict[str, Any]], *, compiled_step: bool = False):
        """`param_groups`: dicts with nanochat's keys (module docstring). `compiled_step=True` fuses
        each AdamW/Muon update into one torch.compile'd graph (the training job's default)."""
        if isinstance(param_groups, torch.Tensor) or not isinstance(param_groups, list | tuple):
            raise TypeError("MuonAdamW takes a list of param-group dicts (each with a 'kind')")
        if not param_groups:
            raise ValueError("MuonAdamW got an empty list of param groups")
        self._tensor_collectives: bool | None = None
        self.compiled_step = bool(compiled_step)
        super().__init__(list(param_groups), defaults={})

    # -- groups ---------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in ("adamw", "muon"):
            raise ValueError(f"param group 'kind' must be 'adamw' or 'muon', got {kind!r}")
        missing = [key for key in (ADAMW_KEYS if kind == "adamw" else MUON_KEYS) if key not in group]
        if missing:
            raise ValueError(f"{kind} param group lacks {missing} (every hyperparameter is explicit; "
                             "GPT.setup_optimizer builds complete groups from nanochat_rs.recipe)")
        params = group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        group["params"] = list(params) if params is not None else []
        if not group["params"]:
            raise ValueError(f"{kind} param group has no params")
        _validate_common(group)
        (_validate_adamw if kind == "adamw" else _validate_muon)(group)
        super().add_param_group(group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("initial_weight_decay", group["weight_decay"])

    # -- state ----------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating state to each param's dtype on load; ours is fp32 by design, keep it."""
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for param_id, param in zip(saved_group["params"], group["params"], strict=True):
                for key, value in state_dict["state"].get(param_id, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[param][key] = value.to(device=param.device)

    def _adamw_state(self, key: torch.Tensor, like: torch.Tensor) -> dict[str, Any]:
        state = self.state[key]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(like.shape, dtype=_math_dtype(like.dtype), device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=_math_dtype(like.dtype), device=like.device)
        _check_state_shape(state["exp_avg"], like.shape)
        return state

    def _muon_state(self, key: torch.Tensor, stacked: torch.Tensor) -> dict[str, Any]:
        state = self.state[key]
        n, rows, cols = stacked.shape
        if not state:
            state["momentum_buffer"] = torch.zeros_like(stacked)
            state["second_momentum_buffer"] = stacked.new_zeros(normuon_state_shape(n, rows, cols))
        _check_state_shape(state["momentum_buffer"], stacked.shape)
        return state

    # -- per-kind updates (local tensors only; no communication) --------------------------------

    def _update(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        return _compiled(name, fn) if self.compiled_step else fn

    def _adamw_step(self, group: dict[str, Any], key: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> None:
        """Update `target` (the param or the shard of it this rank owns) with fp32 (or wider) math."""
        state = self._adamw_state(key, target)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        self._update("adamw", adamw_update_)(
            target, grad, state["exp_avg"], state["exp_avg_sq"], _scalar(state["step"]), _scalar(group["lr"]),
            _scalar(beta1), _scalar(beta2), _scalar(group["eps"]), _scalar(group["weight_decay"]))

    def _muon_step(self, group: dict[str, Any], key: torch.Tensor, params32: torch.Tensor,
                   grads: torch.Tensor) -> None:
        state = self._muon_state(key, params32)
        lr = group["lr"] * aspect_ratio_scale(params32.size(-2), params32.size(-1))
        self._update("muon", muon_update_)(
            params32, grads.to(params32.dtype), state["momentum_buffer"], state["second_momentum_buffer"],
            _scalar(lr), _scalar(group["momentum"]), _scalar(group["beta2"]), _scalar(group["weight_decay"]),
            group["ns_steps"])

    # -- step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world = _world()
        if world is None:
            self._step_local()
        else:
            self._step_distributed(*world)
        return loss

    def _step_local(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    if p.grad is not None:
                        self._adamw_step(group, p, p, p.grad)
                continue
            if all(p.grad is None for p in params):
                continue
            grads = torch.stack([_grad_or_zeros(p) for p in params])
            params32 = torch.stack(params).to(_math_dtype(params[0].dtype))
            self._muon_step(group, params[0], params32, grads)
            torch._foreach_copy_(params, list(params32.unbind(0)))

    def _step_distributed(self, rank: int, world: int) -> None:
        """Reduce every gradient asynchronously up front, then update and re-gather group by group.

        A missing .grad counts as zero here (another rank may hold a real one, and every rank must
        join every collective in the same order). .grad tensors serve as communication buffers, so
        their contents are unspecified after the step.
        """
        if self._tensor_collectives is None:
            self._tensor_collectives = _probe_tensor_collectives(self.param_groups[0]["params"][0].device)
        comm = _Comm(rank, world, self._tensor_collectives)
        jobs: list[_AdamWJob | _MuonJob] = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                jobs.extend(_AdamWJob(self, group, p, comm) for p in group["params"])
            else:
                jobs.append(_MuonJob(self, group, comm))
        for job in jobs:
            job.update_and_gather()
        for job in jobs:
            job.finish()


class _AdamWJob:
    """One AdamW param under ZeRO-2: dim-0 shard when it divides evenly and is big enough."""

    def __init__(self, opt: MuonAdamW, group: dict[str, Any], param: torch.Tensor, comm: _Comm):
        self.opt, self.group, self.param, self.comm = opt, group, param, comm
        grad = _grad_or_zeros(param).contiguous()
        self.sharded = param.dim() >= 1 and param.size(0) % comm.world == 0 and param.numel() >= MIN_SHARD_NUMEL
        if self.sharded:
            rows = param.size(0) // comm.world
            self.target = param.data.narrow(0, comm.rank * rows, rows)
            self.grad = torch.empty_like(self.target, dtype=grad.dtype)
            self.reduce = comm.reduce_scatter_mean(self.grad, grad)
        else:
            self.target = param.data
            self.grad = grad
            self.reduce = comm.all_reduce_mean(grad)
        self.gather: _Pending | None = None

    def update_and_gather(self) -> None:
        self.reduce.wait()
        self.opt._adamw_step(self.group, self.param, self.target, self.grad)
        if self.sharded:
            # The shard is a view into the gather's output buffer; send a copy so no backend ever
            # reads and writes the same memory in one collective.
            self.gather = self.comm.all_gather(self.param.data, self.target.clone())

    def finish(self) -> None:
        if self.gather is not None:
            self.gather.wait()


class _MuonJob:
    """One Muon group under ZeRO-2: the stack of N matrices is split into world-size chunks."""

    def __init__(self, opt: MuonAdamW, group: dict[str, Any], comm: _Comm):
        self.opt, self.group, self.comm = opt, group, comm
        params: list[torch.Tensor] = group["params"]
        self.params = params
        n = len(params)
        self.chunk = -(-n // comm.world)
        self.lo = min(n, comm.rank * self.chunk)
        self.hi = min(n, self.lo + self.chunk)
        shape = (self.chunk * comm.world, *params[0].shape)
        first = params[0]
        full = torch.zeros(shape, dtype=first.grad.dtype if first.grad is not None else first.dtype,
                           device=first.device)
        for i, p in enumerate(params):
            if p.grad is not None:
                full[i].copy_(p.grad)
        self.grad = torch.empty((self.chunk, *params[0].shape), dtype=full.dtype, device=full.device)
        self.reduce = comm.reduce_scatter_mean(self.grad, full)
        self.gathered = torch.empty(shape, dtype=first.dtype, device=first.device)
        self.gather: _Pending | None = None

    def update_and_gather(self) -> None:
        self.reduce.wait()
        shard = torch.zeros((self.chunk, *self.params[0].shape), dtype=self.params[0].dtype,
                            device=self.params[0].device)
        owned = self.params[self.lo:self.hi]
        if owned:
            params32 = torch.stack(owned).to(_math_dtype(owned[0].dtype))
            self.opt._muon_step(self.group, owned[0], params32, self.grad[:len(owned)])
            shard[:len(owned)].copy_(params32)
        self.gather = self.comm.all_gather(self.gathered, shard)

    def finish(self) -> None:
        assert self.gather is not None
        self.gather.wait()
        torch._foreach_copy_(self.params, list(self.gathered[:len(self.params)].unbind(0)))


def _scalar(value: float) -> torch.Tensor:
    """A 0-D CPU tensor: compiled updates take hyperparameters as data, not as constants."""
    return torch.tensor(float(value), dtype=torch.float64)


def _math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer arithmetic and state run in fp32 at least (fp64 params keep fp64)."""
    return torch.promote_types(param_dtype, torch.float32)


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _check_state_shape(buffer: torch.Tensor, expected: Iterable[int]) -> None:
    expected = tuple(expected)
    if tuple(buffer.shape) != expected:
        raise ValueError(
            f"optimizer state has shape {tuple(buffer.shape)} but this rank's shard is {expected}; "
            "was the state saved with a different world size or parameter layout?"
        )


def _require_number(group: dict[str, Any], key: str, low: float, high: float = math.inf) -> None:
    check_number(f"{group['kind']} group '{key}'", group[key], low, high)


def _validate_common(group: dict[str, Any]) -> None:
    _require_number(group, "lr", 0.0)
    _require_number(group, "weight_decay", 0.0)
    for p in group["params"]:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{group['kind']} group params must be tensors, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"{group['kind']} group has a non-floating-point param of dtype {p.dtype}")


def _validate_adamw(group: dict[str, Any]) -> None:
    betas = group["betas"]
    if not isinstance(betas, list | tuple) or len(betas) != 2:
        raise ValueError(f"adamw group 'betas' must be a pair, got {betas!r}")
    group["betas"] = tuple(check_number(f"adamw group 'betas[{i}]'", beta, 0.0, 1.0 - math.ulp(1.0))
                           for i, beta in enumerate(betas))
    _require_number(group, "eps", 0.0)


def _validate_muon(group: dict[str, Any]) -> None:
    _require_number(group, "momentum", 0.0, 1.0 - math.ulp(1.0))
    _require_number(group, "beta2", 0.0, 1.0)  # 1.0 freezes the NorMuon second moment
    ns_steps = group["ns_steps"]
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"muon group 'ns_steps' must be an int in [1, {len(POLAR_EXPRESS_COEFFS)}], got {ns_steps!r}")
    shapes = {tuple(p.shape) for p in group["params"]}
    if len(shapes) != 1:
        raise ValueError(f"all params of one muon group must share a shape (they are stacked), got {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 2:
        raise ValueError(f"muon params must be 2-D matrices, got shape {shape}")
    devices = {p.device for p in group["params"]}
    if len(devices) != 1:
        raise ValueError(f"all params of one muon group must live on one device, got {sorted(map(str, devices))}")


# ----------------------------------------------------------------------------------------------
# Schedules (the formulas live in nanochat_rs.recipe)


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, num_iterations: int,
                    schedule: Schedule = DEFAULT_SCHEDULE) -> dict[str, float]:
    """Set every group's lr, and the Muon groups' momentum and weight decay, for `step`.

    lr = initial_lr * lr_multiplier for every group; the Muon groups' weight decay follows the cosine
    (initial_weight_decay * multiplier) and their momentum the momentum schedule. AdamW groups keep
    their own fixed weight decay, as in nanochat. Returns the multipliers.
    """
    lrm = lr_multiplier(step, num_iterations, schedule)
    wdm = weight_decay_multiplier(step, num_iterations)
    momentum = muon_momentum(step, num_iterations, schedule.warmdown_ratio)
    for group in optimizer.param_groups:
        if "initial_lr" not in group:
            raise ValueError("param group has no 'initial_lr' (MuonAdamW records it at construction)")
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group.setdefault("initial_weight_decay", group["weight_decay"])
            group["weight_decay"] = group["initial_weight_decay"] * wdm
            group["momentum"] = momentum
    return {"lr_multiplier": lrm, "weight_decay_multiplier": wdm, "muon_momentum": momentum}


def apply_sft_schedules(optimizer: torch.optim.Optimizer, step: int, progress: float,
                        schedule: SFTSchedule = DEFAULT_SFT_SCHEDULE) -> dict[str, float]:
    """Fine-tuning's schedules: lr = initial_lr * schedule.lr_multiplier(progress) for every group,
    the Muon groups' momentum from `recipe.sft_muon_momentum(step)`; weight decay stays as set."""
    lrm = schedule.lr_multiplier(progress)
    momentum = sft_muon_momentum(step)
    for group in optimizer.param_groups:
        if "initial_lr" not in group:
            raise ValueError("param group has no 'initial_lr' (MuonAdamW records it at construction)")
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = momentum
    return {"lr_multiplier": lrm, "muon_momentum": momentum}


_HYPERPARAMETER_KEYS = ("lr", "initial_lr", "weight_decay", "initial_weight_decay", "momentum")


def warm_start(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load another run's optimizer state (its momentum and second-moment buffers) but keep this
    optimizer's hyperparameters: `load_state_dict` would also bring back the old run's LRs and weight
    decay, which its schedule had driven to the end of their warmdown."""
    kept = [{key: group[key] for key in _HYPERPARAMETER_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, kept, strict=True):
        group.update(values)
