"""Spec for optim.MuonAdamW: MuonEq, Polar Express, Muon+, NorMuon, cautious weight decay, AdamW math,
compiled == eager, ZeRO-2 sharding."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs import common, optim, recipe
from nanochat_rs.optim import (
    MuonAdamW,
    cautious_weight_decay_step_,
    muon_eq,
    muon_plus,
    normuon,
    orthogonalization_dtype,
    polar_express,
)

SETTINGS = settings(max_examples=20, deadline=None)
TESTS_DIR = Path(__file__).resolve().parent


def muon(params: list[torch.Tensor], **overrides: Any) -> dict[str, Any]:
    """A complete muon group (MuonAdamW requires every hyperparameter) with the recipe's values."""
    return {"kind": "muon", "params": params, "lr": recipe.MATRIX_LR, "momentum": recipe.MUON_MOMENTUM,
            "ns_steps": recipe.MUON_NS_STEPS, "beta2": recipe.MUON_BETA2, "weight_decay": 0.0, **overrides}


def adamw(params: list[torch.Tensor], **overrides: Any) -> dict[str, Any]:
    return {"kind": "adamw", "params": params, "lr": 0.01, "betas": (0.8, 0.95), "eps": recipe.ADAMW_EPS,
            "weight_decay": 0.0, **overrides}


@pytest.fixture(autouse=True)
def fp32_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with fp32 compute unless it says otherwise (a GPU CI box defaults to bf16)."""
    monkeypatch.setattr(common, "COMPUTE_DTYPE", torch.float32)


def random_matrix(kind: str, small: int, seed: int) -> torch.Tensor:
    """Wide/tall: Gaussian (aspect 2 keeps sigma_min / ||X||_F well above Polar Express's 1e-3 design
    bound). Square Gaussians have near-zero singular values, so square ones get a controlled spectrum,
    log-uniform over two decades, in random orthogonal bases."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(torch.empty(()).uniform_(0.01, 100.0, generator=gen))
    if kind == "wide":
        return torch.randn(small, 2 * small, generator=gen) * scale
    if kind == "tall":
        return torch.randn(2 * small, small, generator=gen) * scale
    u, _ = torch.linalg.qr(torch.randn(small, small, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(small, small, generator=gen))
    s = torch.exp(torch.empty(small).uniform_(math.log(1e-2), 0.0, generator=gen))
    return (u * s) @ v.T * scale


# The 5-step composition maps every singular value in [1e-3, 1] (after the Frobenius normalisation)
# into [0.859, 1.141] in exact arithmetic; these bands allow for fp32 / bf16 rounding. Plain
# normalisation without the iteration, wrong coefficients or a missing step all land far outside.
FP32_BAND = (0.85, 1.15)
BF16_BAND = (0.80, 1.20)


@SETTINGS
@given(kind=st.sampled_from(["square", "wide", "tall"]), small=st.sampled_from([16, 32, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_polar_express_singular_values_near_one(kind: str, small: int, seed: int) -> None:
    G = random_matrix(kind, small, seed)
    X = polar_express(G, 5, torch.float32)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X)
    assert FP32_BAND[0] <= sv.min() and sv.max() <= FP32_BAND[1], sv


@SETTINGS
@given(kind=st.sampled_from(["square", "wide", "tall"]), seed=st.integers(0, 2**31 - 1))
def test_polar_express_bf16_when_compute_dtype_is_bf16(kind: str, seed: int) -> None:
    G = random_matrix(kind, 32, seed)
    original = common.COMPUTE_DTYPE
    common.COMPUTE_DTYPE = torch.bfloat16  # (hypothesis can't use function-scoped fixtures)
    try:
        dtype = orthogonalization_dtype(G.dtype)
    finally:
        common.COMPUTE_DTYPE = original
    assert dtype == torch.bfloat16
    X = polar_express(G, 5, dtype)
    assert X.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(X.float())
    assert BF16_BAND[0] <= sv.min() and sv.max() <= BF16_BAND[1], sv


def test_polar_express_singular_vectors_are_those_of_the_input() -> None:
    """The output approximates U V^T, not just any matrix with unit singular values."""
    G = random_matrix("wide", 32, 7)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = polar_express(G, 5, torch.float32)
    # U^T X V must be diagonal with entries in the band
    core = U.T @ X @ Vh.T
    off_diag = core - torch.diag(torch.diagonal(core))
    assert off_diag.abs().max() < 1e-3
    assert torch.diagonal(core).min() >= FP32_BAND[0]


def test_polar_express_is_transpose_equivariant_and_batched() -> None:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, 24, 40, generator=gen)
    batched = polar_express(G, 5, torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], polar_express(G[i], 5, torch.float32), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(polar_express(G[i].T, 5, torch.float32), batched[i].T, rtol=0, atol=0)


def test_polar_express_zero_matrix_stays_zero() -> None:
    X = polar_express(torch.zeros(8, 16), 5, torch.float32)
    assert torch.equal(X, torch.zeros(8, 16))


@pytest.mark.parametrize("bad", [dict(G=torch.zeros(5)), dict(G=torch.zeros(4, 4), steps=0),
                                 dict(G=torch.zeros(4, 4), steps=6)])
def test_polar_express_rejects_bad_input(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        polar_express(**bad)


@pytest.mark.parametrize(("compute", "param", "expected"), [
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float32),  # fp16 overflows in the iteration: never cast to it
    (torch.float32, torch.float64, torch.float64),
])
def test_orthogonalization_dtype_follows_compute_dtype(monkeypatch: pytest.MonkeyPatch, compute: torch.dtype,
                                                       param: torch.dtype, expected: torch.dtype) -> None:
    monkeypatch.setattr(common, "COMPUTE_DTYPE", compute)
    assert orthogonalization_dtype(param) == expected


@pytest.mark.parametrize(("compute", "expected"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                   (torch.float16, torch.float32)])
def test_muon_step_iterates_in_orthogonalization_dtype(monkeypatch: pytest.MonkeyPatch, compute: torch.dtype,
                                                       expected: torch.dtype) -> None:
    monkeypatch.setattr(common, "COMPUTE_DTYPE", compute)
    seen: list[torch.dtype] = []
    real = optim.polar_express

    def spy(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
        seen.append(dtype or G.dtype)
        return real(G, steps, dtype)

    monkeypatch.setattr(optim, "polar_express", spy)
    w = torch.nn.Parameter(torch.randn(8, 16))
    w.grad = torch.randn(8, 16)
    MuonAdamW([muon([w])]).step()
    assert seen == [expected]
    assert w.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# NorMuon


@SETTINGS
@given(rows=st.integers(2, 24), cols=st.integers(2, 24), beta2=st.floats(0.0, 0.99), seed=st.integers(0, 10**6))
def test_normuon_preserves_each_matrix_norm(rows: int, cols: int, beta2: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(3, rows, cols, generator=gen, dtype=torch.float64)
    state = torch.rand(optim.normuon_state_shape(3, rows, cols), generator=gen, dtype=torch.float64)
    out = normuon(u.clone(), state, beta2)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), u.norm(dim=(-2, -1)))


@pytest.mark.parametrize(("rows", "cols"), [(12, 5), (6, 6), (5, 12)])
def test_normuon_equalises_the_long_side(rows: int, cols: int) -> None:
    """With beta2 = 0 the second moment is this step's: every row (rows >= cols) or column (wide)
    of the result has the same norm."""
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, rows, cols, generator=gen, dtype=torch.float64) * torch.rand(2, rows, 1, generator=gen,
                                                                                      dtype=torch.float64)
    state = torch.zeros(optim.normuon_state_shape(2, rows, cols), dtype=torch.float64)
    out = normuon(u.clone(), state, 0.0)
    dim = -1 if rows >= cols else -2
    norms = out.norm(dim=dim)
    torch.testing.assert_close(norms, norms[..., :1].expand_as(norms))
    torch.testing.assert_close(state, u.square().mean(dim=dim, keepdim=True))


def test_normuon_second_moment_is_an_ema() -> None:
    u = torch.full((1, 4, 2), 2.0)
    state = torch.full((1, 4, 1), 1.0)
    normuon(u, state, 0.9)
    torch.testing.assert_close(state, torch.full((1, 4, 1), 0.9 * 1.0 + 0.1 * 4.0))


# ---------------------------------------------------------------------------------------------
# Muon step against a slow reference


def reference_muon(params: list[torch.Tensor], grads_per_step: list[list[torch.Tensor]], *, lr: float,
                   momentum: float, beta2: float, wd: float) -> list[torch.Tensor]:
    """Matrix by matrix, formula by formula (nanochat's Muon step), in float64."""
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    rows, cols = params[0].shape
    per_row = rows >= cols
    vs = [torch.zeros((rows, 1) if per_row else (1, cols), dtype=torch.float64) for _ in params]
    effective_lr = lr * math.sqrt(max(1.0, rows / cols))
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double()
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            x = (1 - momentum) * g + momentum * bufs[i]
            row_norms = x.norm(dim=1, keepdim=True)
            x = x * (x.norm() / math.sqrt(rows)) / row_norms  # MuonEq
            o = polar_express(x, 5, torch.float64)
            o = o * math.sqrt(min(rows, cols)) / o.norm()  # Muon+
            v_now = (o**2).mean(dim=1, keepdim=True) if per_row else (o**2).mean(dim=0, keepdim=True)
            vs[i] = beta2 * vs[i] + (1 - beta2) * v_now
            s = o / torch.sqrt(torch.clamp(vs[i], min=1e-10))
            s = s * (torch.linalg.norm(o) / torch.linalg.norm(s))
            keep = (s * params[i] >= 0).double()
            params[i] = params[i] - effective_lr * s - effective_lr * wd * params[i] * keep
    return params


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)])
def test_muon_matches_reference(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64)) for _ in range(3)]
    grads_per_step = [[torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in params] for _ in range(4)]
    hyper = dict(lr=0.05, momentum=0.9, beta2=0.8, wd=0.3)
    expected = reference_muon([p.detach() for p in params], grads_per_step, **hyper)
    opt = MuonAdamW([muon(params, lr=hyper["lr"], momentum=hyper["momentum"], beta2=hyper["beta2"],
                          weight_decay=hyper["wd"])])
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# MuonEq and Muon+


@SETTINGS
@given(rows=st.integers(2, 40), cols=st.integers(2, 40), seed=st.integers(0, 10**6))
def test_muon_eq_equalises_every_row_norm_to_the_mean(rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(3, rows, cols, generator=gen, dtype=torch.float64) * torch.rand(3, rows, 1, generator=gen,
                                                                                      dtype=torch.float64) * 10
    out = muon_eq(X)
    target = X.norm(dim=(-2, -1), keepdim=True).squeeze(-1) / math.sqrt(rows)
    torch.testing.assert_close(out.norm(dim=-1), target.expand(3, rows))
    # a row rescaling: every row keeps its direction
    cosine = (out * X).sum(-1) / (out.norm(dim=-1) * X.norm(dim=-1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_muon_eq_leaves_a_zero_row_zero() -> None:
    X = torch.randn(4, 6)
    X[2] = 0
    out = muon_eq(X)
    assert torch.equal(out[2], torch.zeros(6)) and torch.isfinite(out).all()


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10**6))
def test_muon_plus_sets_the_frobenius_norm_to_sqrt_min_dim(rows: int, cols: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(2, rows, cols, generator=gen, dtype=torch.float64) * scale
    out = muon_plus(U)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), torch.full((2,), math.sqrt(min(rows, cols)),
                                                                  dtype=torch.float64))
    torch.testing.assert_close(out / out.norm(dim=(-2, -1), keepdim=True), U / U.norm(dim=(-2, -1), keepdim=True))


def test_muon_accepts_beta2_one_which_disables_the_second_moment() -> None:
    """beta2 = 1 (nanochat's own test uses it): the update is Muon+ output, no per-row reweighting."""
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    g = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    p.grad = g.clone()
    MuonAdamW([muon([p], lr=0.1, momentum=0.0, beta2=1.0)]).step()
    x = g * (g.norm() / math.sqrt(12)) / g.norm(dim=1, keepdim=True)
    o = polar_express(x, 5, torch.float64)
    o = o * math.sqrt(8) / o.norm()
    torch.testing.assert_close(p.detach(), p0 - 0.1 * math.sqrt(12 / 8) * o, rtol=1e-9, atol=1e-10)


def test_muon_converges_on_a_least_squares_problem() -> None:
    """nanochat's convergence property: the Muon weights get within half their starting distance of
    the target in a fixed number of steps."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(32, 16, generator=gen)
    inputs = torch.randn(256, 16, generator=gen)
    w = torch.nn.Parameter(torch.zeros(32, 16))
    opt = MuonAdamW([muon([w], lr=0.1, beta2=1.0)])
    start = (w.detach() - target).norm()
    for _ in range(100):
        loss = ((inputs @ w.T - inputs @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (w.detach() - target).norm() < 0.5 * start


def compile_works() -> bool:
    try:
        torch.compile(lambda x: x * 2, dynamic=False)(torch.ones(2))
    except Exception:  # no C++ compiler, unsupported Python, ...
        return False
    return True


@pytest.mark.skipif(not compile_works(), reason="torch.compile does not work on this machine")
def test_compiled_step_equals_eager_step() -> None:
    def run(compiled: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(8)
        mats = [torch.nn.Parameter(torch.randn(16, 24, generator=gen)) for _ in range(2)]
        tall = [torch.nn.Parameter(torch.randn(24, 16, generator=gen))]
        emb = torch.nn.Parameter(torch.randn(10, 4, generator=gen).to(torch.bfloat16))
        opt = MuonAdamW([muon(mats, weight_decay=0.1), muon(tall), adamw([emb], weight_decay=0.01)],
                        compiled_step=compiled)
        for step in range(3):
            for p in (*mats, *tall, emb):
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.param_groups[0]["lr"] = 0.02 * (step + 1)  # new values reach the compiled graph
            opt.step()
        return [p.detach().float() for p in (*mats, *tall, emb)]

    for eager, compiled in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_muon_state_is_stacked_per_group() -> None:
    params = [torch.nn.Parameter(torch.randn(6, 10)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(6, 10)
    opt = MuonAdamW([muon(params)])
    opt.step()
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (3, 6, 10)
    assert state["second_momentum_buffer"].shape == (3, 1, 10)  # wide: per-column statistics
    assert all(len(opt.state[p]) == 0 for p in params[1:])


# ---------------------------------------------------------------------------------------------
# Cautious weight decay


def test_cautious_weight_decay_only_where_signs_agree() -> None:
    p = torch.tensor([1.0, 1.0, -2.0, -2.0, 3.0, 0.5])
    u = torch.tensor([0.5, -0.5, -1.0, 1.0, 0.0, 0.25])
    out = p.clone()
    cautious_weight_decay_step_(out, u, 0.1, 0.5)
    agree = torch.tensor([True, False, True, False, True, True])
    expected = p - 0.1 * u - 0.1 * 0.5 * p * agree
    torch.testing.assert_close(out, expected)
    # disagreeing coordinates moved by the update alone
    torch.testing.assert_close(out[~agree], (p - 0.1 * u)[~agree])


def test_muon_weight_decay_is_cautious_end_to_end() -> None:
    """Same start, same gradient, wd on vs off: the difference is -lr*wd*p exactly where the
    applied update and the param share a sign, and zero elsewhere."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    g = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    lr, wd = 0.05, 0.4
    results = []
    for weight_decay in (0.0, wd):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        MuonAdamW([muon([p], lr=lr, weight_decay=weight_decay)]).step()
        results.append(p.detach())
    no_wd, with_wd = results
    lr = lr * math.sqrt(max(1.0, 12 / 20))  # the decay uses the (aspect-scaled) effective LR
    update = (p0 - no_wd) / lr
    agree = update * p0 >= 0
    assert agree.any() and (~agree).any()
    torch.testing.assert_close(with_wd, no_wd - lr * wd * p0 * agree, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# AdamW


def make_adamw_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in [(7, 5), (13,), ()]]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw(weight_decay: float) -> None:
    ours, theirs = make_adamw_params(torch.float32), make_adamw_params(torch.float32)
    hyper = dict(lr=0.03, betas=(0.8, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt = MuonAdamW([adamw(ours, **hyper)])
    ref = torch.optim.AdamW(theirs, foreach=False, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_math_is_fp32_for_bf16_params() -> None:
    """bf16 param, fp32 state; each step equals one fp32 AdamW step from the bf16 value, rounded to bf16."""
    ours = make_adamw_params(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    opt = MuonAdamW([adamw(ours, **hyper)])
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        for a, b in zip(ours, ref, strict=True):
            g = torch.randn(a.shape, generator=gen)
            a.grad = g.to(torch.bfloat16)
            b.data.copy_(a.detach().float())
            b.grad = a.grad.float()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == torch.bfloat16
            assert torch.equal(a.detach(), b.detach().to(torch.bfloat16))
    for p in ours:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_adamw_skips_params_without_grad() -> None:
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    a.grad = torch.ones(4)
    opt = MuonAdamW([adamw([a, b], lr=0.1, weight_decay=0.5)])
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(4))
    assert torch.equal(b.detach(), torch.ones(4)) and len(opt.state[b]) == 0


# ---------------------------------------------------------------------------------------------
# Construction, state, communication


def test_initial_lr_recorded_and_every_hyperparameter_required() -> None:
    w, e = torch.nn.Parameter(torch.zeros(4, 8)), torch.nn.Parameter(torch.zeros(3))
    opt = MuonAdamW([muon([w], lr=0.02, weight_decay=0.28), adamw([e], lr=0.3)])
    muon_group, adamw_group = opt.param_groups
    assert muon_group["initial_lr"] == 0.02 and muon_group["initial_weight_decay"] == 0.28
    assert adamw_group["initial_lr"] == 0.3
    for group, key in ((muon([w]), "beta2"), (adamw([e]), "betas"), (adamw([e]), "eps")):
        del group[key]
        with pytest.raises(ValueError, match=key):
            MuonAdamW([group])


@pytest.mark.parametrize(("groups", "error"), [
    ([], ValueError),
    ([{"kind": "sgd", "params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}], ValueError),
    ([{"kind": "adamw", "params": [torch.nn.Parameter(torch.zeros(2))]}], ValueError),
    ([adamw([])], ValueError),
    ([adamw([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)], ValueError),
    ([adamw([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))], ValueError),
    ([adamw([torch.nn.Parameter(torch.zeros(2))], lr="0.1")], TypeError),
    ([muon([torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))])], ValueError),
    ([muon([torch.nn.Parameter(torch.zeros(6))])], ValueError),
    ([muon([torch.nn.Parameter(torch.zeros(2, 3))], ns_steps=6)], ValueError),
    ([muon([torch.nn.Parameter(torch.zeros(2, 3))], momentum=1.0)], ValueError),
    ([muon([torch.nn.Parameter(torch.zeros(2, 3))], beta2=1.5)], ValueError),
    ("not a list", TypeError),
])
def test_bad_groups_are_rejected_clearly(groups: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        MuonAdamW(groups)


def one_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def mixed_setup() -> tuple[list[torch.nn.Parameter], MuonAdamW]:
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(8, 12)) for _ in range(2)]
    emb = torch.nn.Parameter(torch.randn(10, 4).to(torch.bfloat16))
    opt = MuonAdamW([muon(mats, lr=0.02, weight_decay=0.1), adamw([emb], lr=0.01)])
    return [*mats, emb], opt


def test_state_dict_round_trip_resumes_exactly() -> None:
    params, opt = mixed_setup()
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        one_step(opt, params, gen)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())  # state_dict() aliases the live state tensors
    gen_state = gen.get_state()
    for _ in range(2):
        one_step(opt, params, gen)
    expected = [p.detach().clone() for p in params]

    params2, opt2 = mixed_setup()
    with torch.no_grad():
        for p, s in zip(params2, saved_params, strict=True):
            p.copy_(s)
    opt2.load_state_dict(saved_state)
    assert opt2.state[params2[-1]]["exp_avg"].dtype == torch.float32  # not cast to the bf16 param dtype
    gen.set_state(gen_state)
    for _ in range(2):
        one_step(opt2, params2, gen)
    for p, e in zip(params2, expected, strict=True):
        assert torch.equal(p.detach(), e)


def test_state_of_the_wrong_shape_is_a_clear_error() -> None:
    """E.g. a ZeRO shard saved under another world size: refuse instead of broadcasting garbage."""
    params, opt = mixed_setup()
    gen = torch.Generator().manual_seed(0)
    one_step(opt, params, gen)
    opt.state[params[-1]]["exp_avg"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="world size"):
        one_step(opt, params, gen)


def test_single_process_makes_no_communication_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("single-process step must not communicate")

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast",
                 "barrier", "reduce_scatter"):
        monkeypatch.setattr(dist, name, forbidden)
    params, opt = mixed_setup()
    one_step(opt, params, torch.Generator().manual_seed(0))


def test_apply_schedules_drives_the_optimizer() -> None:
    _, opt = mixed_setup()
    optim.apply_schedules(opt, 0, 100, recipe.Schedule(warmup_steps=4))
    muon_group, adamw_group = opt.param_groups
    assert muon_group["lr"] == pytest.approx(0.02 * 0.25)
    assert adamw_group["lr"] == pytest.approx(0.01 * 0.25)
    assert muon_group["momentum"] == pytest.approx(0.85)
    assert "momentum" not in adamw_group
    optim.apply_schedules(opt, 50, 100, recipe.Schedule(warmup_steps=4))
    assert muon_group["weight_decay"] == pytest.approx(0.1 * 0.5)
    assert muon_group["initial_lr"] == 0.02


# ---------------------------------------------------------------------------------------------
# Two processes (gloo) == one process on the same global batch


def load_worker() -> Any:
    spec = importlib.util.spec_from_file_location("_dist_worker_optim", TESTS_DIR / "_dist_worker_optim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir: Path, world: int) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    # the workers import the very nanochat_rs this process imported
    package_root = str(Path(optim.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, str(TESTS_DIR / "_dist_worker_optim.py"), str(out_dir)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    worker = load_worker()
    run_ranks(tmp_path, 2)
    reference = worker.build_model()
    worker.train(reference, 0, 1)
    expected = reference.state_dict()
    for mode in worker.MODES:
        ranks = [torch.load(tmp_path / f"rank{r}_{mode}.pt") for r in range(2)]
        for r, result in enumerate(ranks):
            assert result["params"].keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, n=name, r=r, mode=mode: f"{mode} rank {r} {n}: {m}")
        if mode == "fallback":
            assert ranks[0]["tensor_collectives"] is False
        # ZeRO-2: each rank holds only its shard of the state
        shapes = [result["state_shapes"] for result in ranks]
        for r in range(2):
            assert shapes[r]["emb.weight"]["exp_avg"] == (32, 64)  # dim-0 shard of 64 x 64
            assert shapes[r]["head.weight"]["exp_avg"] == (65, 64)  # 65 rows: not divisible, replicated
            assert shapes[r]["scale"]["exp_avg"] == (3,)  # small: replicated
        assert shapes[0]["up.0.weight"]["momentum_buffer"] == (2, 128, 64)  # 3 matrices split 2 + 1
        assert shapes[1]["up.2.weight"]["momentum_buffer"] == (1, 128, 64)
        assert shapes[0]["down.weight"]["momentum_buffer"] == (1, 64, 128)  # 1 matrix: rank 1 owns none
        assert "down.weight" not in shapes[1]
        assert shapes[0]["mix.0.weight"]["momentum_buffer"] == (1, 64, 64)
        assert shapes[1]["mix.1.weight"]["momentum_buffer"] == (1, 64, 64)
