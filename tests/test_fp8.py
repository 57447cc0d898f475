"""Spec for fp8.py: tensorwise quantisation, the fp8 autograd matmul, Float8Linear and model conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from nanochat_rs import fp8
from nanochat_rs.fp8 import (
    E4M3,
    E5M2,
    Float8Linear,
    convert_to_float8_training,
    disable_fp8,
    scaled_mm_supported,
    to_fp8,
)

SETTINGS = settings(max_examples=50, deadline=None)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def require_scaled_mm(device: str) -> None:
    if not scaled_mm_supported(device):
        pytest.skip(f"torch._scaled_mm is not available on {device} in this torch build")


def dequantize(x_fp8: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return x_fp8.float() * inv_scale


# ---------------------------------------------------------------------------------------------
# Quantisation


@SETTINGS
@given(dtype=st.sampled_from([E4M3, E5M2]), log_scale=st.floats(-20, 20), n=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1), heavy_tail=st.booleans())
def test_to_fp8_round_trip_error_is_within_fp8_precision(dtype: torch.dtype, log_scale: float, n: int, seed: int,
                                                        heavy_tail: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 2.0**log_scale
    if heavy_tail:  # values spread over many binades, some in fp8's subnormal range after scaling
        x = x * torch.exp(torch.randn(n, generator=gen) * 4)
    x_fp8, inv_scale = to_fp8(x, dtype)
    assert x_fp8.dtype == dtype and x_fp8.shape == x.shape
    assert inv_scale.dtype == torch.float32 and inv_scale.dim() == 0
    info = torch.finfo(dtype)
    # round to nearest: half an ulp, relative (eps/2) for normals, absolute below the normal range
    y = x.double() / inv_scale.double()
    bound = torch.maximum(y.abs() * info.eps / 2, torch.full_like(y, info.smallest_normal * info.eps / 2))
    err = (x_fp8.double() - y).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-30).all(), (err / bound).max()
    # the largest magnitude lands on the top of the fp8 range
    assert x_fp8.float().abs().max() == info.max


def test_to_fp8_relative_error_bounds_for_normal_values() -> None:
    x = torch.linspace(0.5, 1.0, 1000)  # one binade below the max: all normal after scaling
    for dtype, rel in ((E4M3, 2.0**-4), (E5M2, 2.0**-3)):
        x_fp8, inv = to_fp8(x, dtype)
        assert ((dequantize(x_fp8, inv) - x).abs() / x).max() <= rel * (1 + 1e-6)


def test_to_fp8_zero_and_sign() -> None:
    x_fp8, inv = to_fp8(torch.zeros(4, 4), E4M3)
    assert torch.equal(x_fp8.float(), torch.zeros(4, 4)) and torch.isfinite(inv)
    x = torch.tensor([-3.0, 3.0, -0.5])
    x_fp8, inv = to_fp8(x, E5M2)
    assert torch.equal(torch.sign(x_fp8.float()), torch.sign(x))


def test_to_fp8_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        to_fp8(torch.ones(3), torch.bfloat16)
    with pytest.raises(TypeError):
        to_fp8(torch.ones(3, dtype=torch.int32), E4M3)


# ---------------------------------------------------------------------------------------------
# The autograd function


def reference_fp8_linear(x: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same quantisation, products of the dequantised tensors in fp64."""
    xq, wq, gq = dequantize(*to_fp8(x, E4M3)), dequantize(*to_fp8(w, E4M3)), dequantize(*to_fp8(grad_out, E5M2))
    xq, wq, gq = xq.double(), wq.double(), gq.double()
    return xq @ wq.T, gq @ wq, gq.T @ xq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [32, 15])  # 15: the grad_weight GEMM needs its token dim padded to 16
def test_float8_linear_matches_dequantised_reference(device: str, rows: int) -> None:
    require_scaled_mm(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 48, generator=gen).to(device).requires_grad_()
    layer = Float8Linear(48, 32, bias=False, device=device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 48, generator=gen))
    grad_out = torch.randn(rows, 32, generator=gen).to(device)
    out = layer(x)
    out.backward(grad_out)
    ref_out, ref_gx, ref_gw = reference_fp8_linear(x.detach(), layer.weight.detach(), grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), ref_gw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_float8_linear_is_close_to_nn_linear(device: str) -> None:
    require_scaled_mm(device)
    torch.manual_seed(0)
    plain = nn.Linear(64, 48, bias=True, device=device)
    fp8_layer = Float8Linear.from_linear(nn.Linear(64, 48, bias=True, device=device))
    with torch.no_grad():
        fp8_layer.weight.copy_(plain.weight)
        fp8_layer.bias.copy_(plain.bias)
    x = torch.randn(4, 8, 64, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_fp8 = plain(x1), fp8_layer(x2)
    assert out_fp8.shape == out_plain.shape == (4, 8, 48)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_fp8.backward(grad)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())

    # e4m3 carries ~3 significant bits, e5m2 ~2: a few percent of relative error, not more
    assert rel(out_fp8, out_plain) < 0.08
    assert rel(x2.grad, x1.grad) < 0.12
    assert rel(fp8_layer.weight.grad, plain.weight.grad) < 0.12
    torch.testing.assert_close(fp8_layer.bias.grad, plain.bias.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_float8_linear_dtypes_follow_input_and_master_weight(device: str) -> None:
    require_scaled_mm(device)
    layer = Float8Linear(32, 16, bias=False, device=device)  # fp32 master weight
    x = torch.randn(16, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        out = layer(x)
        out.float().sum().backward()
    except RuntimeError as e:  # some CPU builds lack bf16 outputs for _scaled_mm
        pytest.skip(f"bf16 _scaled_mm output unsupported here: {e}")
    assert out.dtype == torch.bfloat16
    assert x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32


def test_saved_tensors_are_the_quantised_ones() -> None:
    require_scaled_mm("cpu")
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    out = fp8._Float8Matmul.apply(x, w)
    saved = out.grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [E4M3, torch.float32, E4M3, torch.float32]
    assert saved[0].shape == x.shape and saved[2].shape == w.shape
    assert saved[1].dim() == 0 and saved[3].dim() == 0


def test_backward_quantises_only_the_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    require_scaled_mm("cpu")
    calls: list[tuple[torch.dtype, tuple[int, ...]]] = []
    real = fp8.to_fp8

    def counting(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((dtype, tuple(x.shape)))
        return real(x, dtype)

    monkeypatch.setattr(fp8, "to_fp8", counting)
    layer = Float8Linear(32, 16, bias=False)
    x = torch.randn(2, 8, 32, requires_grad=True)
    out = layer(x)
    assert calls == [(E4M3, (16, 32)), (E4M3, (16, 32))]  # input (flattened) and weight, once each
    out.sum().backward()
    assert calls[2:] == [(E5M2, (16, 16))]  # backward: grad_output only


def test_backward_uses_the_weight_as_it_was_at_forward() -> None:
    """Mutating the weight between forward and backward changes nothing: backward reads the saved
    fp8 copy (and since the live weight isn't saved, autograd's version check has nothing to object to)."""
    require_scaled_mm("cpu")
    torch.manual_seed(1)
    layer = Float8Linear(32, 16, bias=False)
    x = torch.randn(16, 32, requires_grad=True)
    grad = torch.randn(16, 16)
    out = layer(x)
    out.backward(grad)
    expected_gx, expected_gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None

    out = layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(1.0)
    out.backward(grad)
    assert torch.equal(x.grad, expected_gx)
    assert torch.equal(layer.weight.grad, expected_gw)


# ---------------------------------------------------------------------------------------------
# Conversion and disabling


class CastLinear(nn.Linear):
    """Like the model's Linear: casts the weight to the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64, bias=False)
        self.blocks = nn.ModuleList([CastLinear(64, 64, bias=False), nn.Linear(64, 30, bias=False)])
        self.odd = nn.Linear(30, 32, bias=False)  # in_features 30: not fp8-able
        self.head = CastLinear(32, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        x = torch.relu(self.blocks[0](x))
        x = self.odd(self.blocks[1](x))
        return self.norm(self.head(x))


def test_convert_swaps_only_eligible_linears_and_keeps_weights() -> None:
    net = Net()
    before = {name: p for name, p in net.named_parameters()}
    assert convert_to_float8_training(net) is net
    assert isinstance(net.inp, Float8Linear)
    assert isinstance(net.blocks[0], Float8Linear)
    assert isinstance(net.head, Float8Linear)
    assert type(net.blocks[1]) is nn.Linear  # out_features 30
    assert type(net.odd) is nn.Linear  # in_features 30
    assert type(net.norm) is nn.LayerNorm
    after = dict(net.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)  # same Parameter objects


def test_convert_respects_the_filter() -> None:
    net = Net()
    seen: list[str] = []

    def no_head(module: nn.Module, fqn: str) -> bool:
        seen.append(fqn)
        return fqn != "head"

    convert_to_float8_training(net, module_filter_fn=no_head)
    assert isinstance(net.inp, Float8Linear) and isinstance(net.blocks[0], Float8Linear)
    assert type(net.head) is CastLinear
    assert sorted(seen) == ["blocks.0", "head", "inp"]  # asked only about eligible modules


def test_convert_root_linear_and_idempotence() -> None:
    root = nn.Linear(16, 16)
    converted = convert_to_float8_training(root)
    assert isinstance(converted, Float8Linear) and converted.weight is root.weight and converted.bias is root.bias
    net = convert_to_float8_training(Net())
    inner = net.inp
    convert_to_float8_training(net)
    assert net.inp is inner  # already converted modules are left alone


def test_float8_linear_rejects_bad_dims() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(30, 16)


def test_disable_fp8_uses_plain_matmuls_and_restores() -> None:
    require_scaled_mm("cpu")
    torch.manual_seed(0)
    net = Net()
    plain = Net()
    plain.load_state_dict(net.state_dict())
    convert_to_float8_training(net)
    x = torch.randn(16, 32)
    with torch.no_grad():
        expected = plain(x)
        fp8_out = net(x)
        with disable_fp8(net) as same:
            assert same is net
            assert torch.equal(net(x), expected)
        assert torch.equal(net(x), fp8_out)
    assert not torch.equal(fp8_out, expected)
    with pytest.raises(RuntimeError), disable_fp8(net):
        raise RuntimeError("boom")
    assert all(m.fp8_enabled for m in net.modules() if isinstance(m, Float8Linear))
