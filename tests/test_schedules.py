"""Spec for the training schedules in optim: LR warmup/warmdown, Muon momentum, weight-decay cosine."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs.optim import apply_schedules, lr_multiplier, muon_momentum, weight_decay_multiplier

SETTINGS = settings(max_examples=200, deadline=None)
N = 1000  # warmdown = 650 steps starting at step 350


# ---------------------------------------------------------------------------------------------
# LR


def test_lr_warmup_boundaries() -> None:
    assert lr_multiplier(0, N) == pytest.approx(1 / 40)
    assert lr_multiplier(19, N) == pytest.approx(20 / 40)
    assert lr_multiplier(39, N) == 1.0  # warmup ends: full LR
    assert lr_multiplier(40, N) == 1.0


def test_lr_warmdown_boundaries() -> None:
    start = N - round(0.65 * N)
    assert start == 350
    assert lr_multiplier(start, N) == 1.0  # last step at full LR
    assert lr_multiplier(start + 1, N) == pytest.approx(1 - (1 / 650) * 0.95)
    assert lr_multiplier(start + 325, N) == pytest.approx(0.5 * 1 + 0.5 * 0.05)  # halfway down
    assert lr_multiplier(N - 1, N) == pytest.approx(0.05 + 0.95 / 650)  # the last step that trains
    assert lr_multiplier(N, N) == pytest.approx(0.05)


def test_lr_custom_arguments() -> None:
    assert lr_multiplier(0, 10, warmup_steps=0, warmdown_ratio=0.0) == 1.0
    assert lr_multiplier(10, 10, warmup_steps=0, warmdown_ratio=0.0) == 1.0
    assert lr_multiplier(10, 10, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0) == 0.0
    assert lr_multiplier(5, 10, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0) == pytest.approx(0.5)


@SETTINGS
@given(n=st.integers(1, 3000), warmup=st.integers(0, 100), ratio=st.floats(0.0, 1.0),
       final=st.floats(0.0, 1.0), data=st.data())
def test_lr_shape(n: int, warmup: int, ratio: float, final: float, data: st.DataObject) -> None:
    """Bounded by [0, 1], non-decreasing through warmup, non-increasing afterwards, ends at final."""
    step = data.draw(st.integers(0, n - 1))
    lrm = lr_multiplier(step, n, warmup, ratio, final)
    nxt = lr_multiplier(step + 1, n, warmup, ratio, final)
    assert 0.0 <= lrm <= 1.0
    if step + 1 < warmup and round(ratio * n) == 0:
        assert nxt >= lrm
    if step + 1 >= warmup:
        assert nxt <= lrm + 1e-12
        assert lrm >= final - 1e-12
    if warmup <= n and round(ratio * n) > 0:
        assert lr_multiplier(n, n, warmup, ratio, final) == pytest.approx(final)


# ---------------------------------------------------------------------------------------------
# Muon momentum


def test_momentum_warmup_boundaries() -> None:
    assert muon_momentum(0, N) == pytest.approx(0.85)
    assert muon_momentum(200, 10_000) == pytest.approx(0.91)
    assert muon_momentum(400, 10_000) == pytest.approx(0.97)
    assert muon_momentum(1000, 10_000) == pytest.approx(0.97)


def test_momentum_warmdown_boundaries() -> None:
    n = 10_000
    start = n - round(0.65 * n)
    assert muon_momentum(start, n) == pytest.approx(0.97)
    assert muon_momentum(start + 3250, n) == pytest.approx(0.935)  # halfway across the warmdown
    assert muon_momentum(n, n) == pytest.approx(0.90)
    assert muon_momentum(n - 1, n) == pytest.approx(0.90 + 0.07 / 6500)


def test_momentum_when_warmdown_starts_during_warmup() -> None:
    """Short runs: the warmdown ramp caps the rising one, so the schedule stays continuous."""
    assert muon_momentum(0, 100) == pytest.approx(0.85)
    assert muon_momentum(30, 100) == pytest.approx(0.85 + 0.12 * 30 / 400)  # still rising
    assert muon_momentum(100, 100) == pytest.approx(0.88)  # rising ramp (0.88) below the falling one (0.90)
    assert muon_momentum(1000, 1000) == pytest.approx(0.90)  # falling ramp crossed below the rising one
    values = [muon_momentum(s, 100) for s in range(101)]
    assert max(abs(a - b) for a, b in zip(values, values[1:], strict=False)) < 0.01


@SETTINGS
@given(n=st.integers(1, 5000), ratio=st.floats(0.0, 1.0), data=st.data())
def test_momentum_range(n: int, ratio: float, data: st.DataObject) -> None:
    step = data.draw(st.integers(0, n))
    m = muon_momentum(step, n, ratio)
    assert 0.85 - 1e-12 <= m <= 0.97 + 1e-12
    if step >= 400:
        assert m >= 0.90 - 1e-12


# ---------------------------------------------------------------------------------------------
# Weight decay


def test_weight_decay_cosine_ends() -> None:
    assert weight_decay_multiplier(0, N) == 1.0
    assert weight_decay_multiplier(N // 2, N) == pytest.approx(0.5)
    assert weight_decay_multiplier(N, N) == pytest.approx(0.0, abs=1e-12)
    assert weight_decay_multiplier(N // 4, N) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@SETTINGS
@given(n=st.integers(1, 5000), data=st.data())
def test_weight_decay_monotone(n: int, data: st.DataObject) -> None:
    step = data.draw(st.integers(0, n - 1))
    a, b = weight_decay_multiplier(step, n), weight_decay_multiplier(step + 1, n)
    assert 0.0 <= b <= a <= 1.0


# ---------------------------------------------------------------------------------------------
# Validation and apply_schedules


@pytest.mark.parametrize("call", [
    lambda: lr_multiplier(-1, 10),
    lambda: lr_multiplier(11, 10),
    lambda: lr_multiplier(0, 0),
    lambda: lr_multiplier(0, 10, warmup_steps=-1),
    lambda: lr_multiplier(0, 10, warmdown_ratio=1.5),
    lambda: lr_multiplier(0, 10, final_lr_frac=2.0),
    lambda: muon_momentum(-1, 10),
    lambda: weight_decay_multiplier(11, 10),
])
def test_bad_schedule_arguments(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call()


class FakeOptimizer:
    """apply_schedules only touches param_groups; any optimizer-shaped object works."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups


def test_apply_schedules_sets_every_group() -> None:
    opt = FakeOptimizer([
        {"kind": "muon", "lr": 0.02, "initial_lr": 0.02, "weight_decay": 0.28, "momentum": 0.95},
        {"kind": "adamw", "lr": 0.3, "initial_lr": 0.3, "weight_decay": 0.0},
    ])
    multipliers = apply_schedules(opt, 500, N)
    muon_group, adamw_group = opt.param_groups
    assert multipliers["lr_multiplier"] == pytest.approx(lr_multiplier(500, N))
    assert muon_group["lr"] == pytest.approx(0.02 * lr_multiplier(500, N))
    assert adamw_group["lr"] == pytest.approx(0.3 * lr_multiplier(500, N))
    assert muon_group["weight_decay"] == pytest.approx(0.28 * weight_decay_multiplier(500, N))
    assert muon_group["initial_weight_decay"] == 0.28
    assert muon_group["momentum"] == pytest.approx(muon_momentum(500, N))
    assert "momentum" not in adamw_group
    # schedules are functions of the step, not of the previous call
    apply_schedules(opt, 10, N)
    assert muon_group["weight_decay"] == pytest.approx(0.28 * weight_decay_multiplier(10, N))
    assert muon_group["lr"] == pytest.approx(0.02 * lr_multiplier(10, N))


def test_apply_schedules_passes_its_arguments_through() -> None:
    opt = FakeOptimizer([{"kind": "muon", "lr": 1.0, "initial_lr": 1.0, "weight_decay": 0.0}])
    apply_schedules(opt, 90, 100, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.param_groups[0]["momentum"] == pytest.approx(muon_momentum(90, 100, warmdown_ratio=0.2))


def test_apply_schedules_needs_initial_lr() -> None:
    with pytest.raises(ValueError, match="initial_lr"):
        apply_schedules(FakeOptimizer([{"lr": 0.1}]), 0, 10)
