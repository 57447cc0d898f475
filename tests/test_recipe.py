"""Spec for the training recipe: nanochat's parameter groups and schedules, checked against numbers
computed by hand from the published formulas (never from the code under test)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs import recipe
from nanochat_rs.gpt import GPTConfig, build_model
from nanochat_rs.optim import apply_schedules
from nanochat_rs.recipe import Schedule, lr_multiplier, muon_momentum, weight_decay_multiplier

N = 1000  # default schedule: warmup 40, warmdown round(0.65 * 1000) = 650 steps from step 350


# ---- parameter groups (issue item 2) --------------------------------------------------------------

N_EMBD = 192  # s = (192 / 768) ** -0.5 = 2 exactly


@pytest.fixture(scope="module")
def groups() -> dict[str, dict]:
    model = build_model(GPTConfig(sequence_len=64, vocab_size=300, n_layer=3, n_head=3, n_kv_head=3,
                                  n_embd=N_EMBD), "cpu")
    optimizer = model.setup_optimizer()
    named = {group["name"]: group for group in optimizer.param_groups}
    named["_model"] = {"model": model, "optimizer": optimizer}
    return named


def test_lm_head_group(groups: dict[str, dict]) -> None:
    g = groups["lm_head"]
    assert (g["kind"], g["lr"], g["betas"], g["weight_decay"], g["eps"]) == ("adamw", 0.016, (0.8, 0.96), 0.01, 1e-10)


def test_wte_group(groups: dict[str, dict]) -> None:
    g = groups["wte"]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.6, (0.8, 0.995), 0.001)


def test_value_embeds_have_their_own_group(groups: dict[str, dict]) -> None:
    g = groups["value_embeds"]
    model = groups["_model"]["model"]
    assert {id(p) for p in g["params"]} == {id(p) for p in model.value_embeds.parameters()}
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.3, (0.8, 0.995), 0.01)  # 0.3 * 2 * 0.5


def test_resid_lambdas_group_is_not_dim_scaled(groups: dict[str, dict]) -> None:
    g = groups["resid_lambdas"]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.005, (0.8, 0.95), 0.05)


def test_x0_lambdas_group(groups: dict[str, dict]) -> None:
    g = groups["x0_lambdas"]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.5, (0.96, 0.95), 0.0)


def test_smear_and_backout_group_has_a_fixed_lr(groups: dict[str, dict]) -> None:
    g = groups["smear_backout"]
    model = groups["_model"]["model"]
    assert [id(p) for p in g["params"]] == [id(model.smear_gate.weight), id(model.smear_lambda),
                                           id(model.backout_lambda)]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (0.2, (0.8, 0.95), 0.0)


def test_muon_groups_one_per_matrix_shape(groups: dict[str, dict]) -> None:
    model = groups["_model"]["model"]
    muon = [g for g in groups["_model"]["optimizer"].param_groups if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted({tuple(p.shape) for p in model.transformer.h.parameters()})
    for g in muon:
        assert (g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.02, 0.95, 5, 0.9, 0.28)
        assert len({tuple(p.shape) for p in g["params"]}) == 1


def test_every_parameter_is_in_exactly_one_group(groups: dict[str, dict]) -> None:
    model = groups["_model"]["model"]
    ids = [id(p) for g in groups["_model"]["optimizer"].param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_setup_optimizer_keeps_nanochats_signature() -> None:
    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2,
                                  n_embd=768), "cpu")  # s = 1
    optimizer = model.setup_optimizer(0.004, 0.2, 0.03, 0.1, 0.7)  # nanochat's positional order
    named = {g["name"]: g for g in optimizer.param_groups}
    assert named["lm_head"]["lr"] == 0.004 and named["wte"]["lr"] == 0.2
    assert named["value_embeds"]["lr"] == 0.1 and named["x0_lambdas"]["lr"] == 0.7
    assert named["resid_lambdas"]["lr"] == pytest.approx(0.007) and named["smear_backout"]["lr"] == 0.2
    assert all(g["lr"] == 0.03 and g["weight_decay"] == 0.1 for g in optimizer.param_groups if g["kind"] == "muon")


def test_smear_and_backout_have_nanochats_shapes() -> None:
    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2,
                                  n_embd=64), "cpu")
    assert model.smear_lambda.shape == (1,) and model.backout_lambda.shape == (1,)


# ---- LR schedule (issue item 4) -------------------------------------------------------------------


def test_lr_during_warmup_is_step_plus_one_over_warmup() -> None:
    assert lr_multiplier(0, N) == 1 / 40
    assert lr_multiplier(19, N) == 20 / 40
    assert lr_multiplier(39, N) == 1.0
    assert lr_multiplier(40, N) == 1.0


def test_lr_warmdown_is_linear_to_the_final_fraction() -> None:
    assert lr_multiplier(350, N) == 1.0  # it <= num_iterations - warmdown_iters
    assert lr_multiplier(351, N) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier(675, N) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(999, N) == pytest.approx(1 / 650 + (649 / 650) * 0.05)
    assert lr_multiplier(1000, N) == pytest.approx(0.05)


def test_lr_warmup_wins_where_it_overlaps_the_warmdown() -> None:
    # 50 steps, warmdown round(0.65 * 50) = 32 steps from step 18: step 30 is still in the 40-step warmup
    assert lr_multiplier(30, 50) == 31 / 40
    assert lr_multiplier(45, 50) == pytest.approx(5 / 32 + (27 / 32) * 0.05)


def test_lr_with_a_custom_schedule() -> None:
    schedule = Schedule(warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0)
    assert lr_multiplier(80, 100, schedule) == 1.0
    assert lr_multiplier(90, 100, schedule) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, Schedule(warmup_steps=0, warmdown_ratio=0.0)) == 1.0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), warmup=st.integers(0, 100), ratio=st.floats(0.0, 1.0), final=st.floats(0.0, 1.0),
       data=st.data())
def test_lr_stays_in_its_band(n: int, warmup: int, ratio: float, final: float, data: st.DataObject) -> None:
    step = data.draw(st.integers(0, n))
    value = lr_multiplier(step, n, Schedule(warmup, ratio, final))
    assert 0.0 < value <= 1.0 or (value == final == 0.0)
    assert value >= min(final, 1 / max(warmup, 1)) - 1e-12


# ---- Muon momentum schedule -----------------------------------------------------------------------


def test_momentum_ramps_from_085_to_097_over_400_steps() -> None:
    assert muon_momentum(0, N) == 0.85
    assert muon_momentum(200, N) == pytest.approx(0.5 * 0.85 + 0.5 * 0.97)
    assert muon_momentum(399, N) == pytest.approx((1 / 400) * 0.85 + (399 / 400) * 0.97)


def test_momentum_falls_to_090_across_the_warmdown() -> None:
    n = 2000  # warmdown 1300 steps from step 700
    assert muon_momentum(500, n) == 0.97
    assert muon_momentum(700, n) == 0.97
    assert muon_momentum(1350, n) == pytest.approx(0.97 * 0.5 + 0.90 * 0.5)
    assert muon_momentum(2000, n) == pytest.approx(0.90)


def test_momentum_ramp_wins_before_step_400_even_in_the_warmdown() -> None:
    # N = 1000: the warmdown starts at 350, but steps < 400 stay on the ramp
    assert muon_momentum(380, N) == pytest.approx((20 / 400) * 0.85 + (380 / 400) * 0.97)
    assert muon_momentum(400, N) == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * (50 / 650))


# ---- weight decay schedule ------------------------------------------------------------------------


def test_weight_decay_is_a_cosine_to_zero() -> None:
    assert weight_decay_multiplier(0, N) == 1.0
    assert weight_decay_multiplier(500, N) == pytest.approx(0.5)
    assert weight_decay_multiplier(250, N) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert weight_decay_multiplier(N, N) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("call", [
    lambda: lr_multiplier(-1, 10), lambda: lr_multiplier(11, 10), lambda: lr_multiplier(0, 0),
    lambda: muon_momentum(-1, 10), lambda: weight_decay_multiplier(11, 10),
    lambda: Schedule(warmup_steps=-1), lambda: Schedule(warmdown_ratio=1.5), lambda: Schedule(final_lr_frac=-0.1),
    lambda: Schedule(final_lr_frac=float("nan")),
])
def test_bad_schedule_arguments(call) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        call()


# ---- apply_schedules ------------------------------------------------------------------------------


def test_weight_decay_schedule_touches_only_the_muon_groups() -> None:
    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2,
                                  n_embd=64), "cpu")
    optimizer = model.setup_optimizer(weight_decay=0.2)
    multipliers = apply_schedules(optimizer, 500, N)
    assert multipliers == pytest.approx({"lr_multiplier": 500 / 650 + (150 / 650) * 0.05,
                                         "weight_decay_multiplier": 0.5,
                                         "muon_momentum": 0.97 * (1 - 150 / 650) + 0.90 * (150 / 650)})
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * (500 / 650 + (150 / 650) * 0.05))
        if group["kind"] == "muon":
            assert group["weight_decay"] == pytest.approx(0.2 * 0.5)
            assert group["momentum"] == pytest.approx(0.97 * (1 - 150 / 650) + 0.90 * (150 / 650))
        else:
            assert group["weight_decay"] == group["initial_weight_decay"]
            assert "momentum" not in group
    apply_schedules(optimizer, 10, N)  # a function of the step, not of the previous call
    muon = next(g for g in optimizer.param_groups if g["kind"] == "muon")
    assert muon["lr"] == pytest.approx(0.02 * 11 / 40)


def test_apply_schedules_needs_initial_lr() -> None:
    class Fake:
        param_groups = [{"lr": 0.1}]

    with pytest.raises(ValueError, match="initial_lr"):
        apply_schedules(Fake(), 0, 10)  # type: ignore[arg-type]


# ---- the depth dial -------------------------------------------------------------------------------


def test_batch_lr_and_weight_decay_scaling() -> None:
    assert recipe.lr_batch_scale(2**17) == 0.5
    # wd * sqrt(B / B_ref) * D_ref / D
    assert recipe.scaled_weight_decay(0.28, 2**21, 1e9, 4e9) == pytest.approx(0.28 * 2 * 0.25)
    # B = 2^19 * (D / D_ref) ** 0.383, to a power of two, as a multiple of the micro step
    assert recipe.optimal_batch_tokens(1e9, 1e9, 2**16) == 2**19
    assert recipe.optimal_batch_tokens(8e9, 1e9, 2**16) == 2 ** round(19 + 3 * 0.383)
    assert recipe.optimal_batch_tokens(1e9, 1e9, 3 * 2**16) == 3 * 2**16 * round(2**19 / (3 * 2**16))


def test_recipe_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, nanochat_rs.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert torch  # the test module itself uses torch; the recipe must not
